"""Records: the question sets, their seeded splits, the benchmark runners that answer them with every
stage, the record table and its hidden-state features, and the P(IK) probes trained on them."""
