"""Choosing a policy offline from records: replay, the threshold sweep and frontier, Learn-then-Test
and its bounds, re-splits, policy files, and the statistics that compare cascades."""
