"""The composition layer: the one place that wires `models/` to the method modules.

- `locations`: where records, features, probes and policy files live (environment overrides).
- `tables`: a preset's records as one RecordTable (recorded API stages included), features.
- `live`: a runnable cascade from a preset (backends, policies, probes), fetching models.
- `jobs`: running a stage's benchmark, training probes and writing P(IK) back into the records.

The CLI, the app and the servers call these; the method modules never import them, and they
compute nothing themselves. Nothing is imported here, so `locations` stays importable alone.
"""
