"""A cascade that watches itself in production (issue 25).

- `trace_store`: every routed question's trace in an embedded SQLite file (WAL), with retention;
- `audit`: a seeded share of the questions also runs the stages the cascade skipped, in the
  background, so the label-free loss of keeping is sampled without bias;
- `recertify`: the running policy's label-free loss from that sample, with an anytime-valid
  confidence sequence against the policy's target (holds / not yet known / at risk / broken);
- `drift`: keep rates and P(T)/P(IK) bins against what calibration expected, by e-detectors;
- `service`: the glue the server calls (record, audit, fallback, /health and /metrics details);
- `view`: what the terminal view and the Monitor page show, computed from the database;
- `from_traces`: a new label-free policy file from the audited traffic.

The method parts (`recertify`, `drift`) are pure functions and small state machines over plain
numbers; only `setup` and `from_traces` reach the composition layer (records, policy files).
"""
