"""Checkpoint a long benchmark's hidden-state features into the committed store, so nothing is lost.

`bench/full_mmlu.sh` keeps every question's features as local chunk files (gitignored, several
layers). A session can end mid-run, and the next may be on another machine, so once an hour
`bench/checkpoint_loop.sh` runs this and commits the result: for each stage, the layer its
current probe reads, for every record that has features so far, as a partial export under
`data/hidden/<dataset>/<stage>/` (`features_store.export_layer(partial=True)`: its manifest says
how many records it covers). A run resumed on another machine skips those questions' backfill
(`bench.backfill_features(have_elsewhere=...)`) and probe training merges the two sources.

    usage: bench/checkpoint_features.py [--preset default] [--dataset mmlu]
Ends with one JSON line: rows exported and records per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade_core.records.runner import load_records
from cascade_core.compose.features import checkpoint_features
from cascade_core.locations import locations
from cascade_core.presets import load_preset
from cascade_core.probe import PIKProbe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dataset", default="mmlu")
    args = parser.parse_args()
    where = locations()
    figures: dict = {}
    for config in load_preset(args.preset).stages:
        records_path = where.record_path(config.name, args.dataset)
        probe_path = where.probe_path(config)
        if config.backend == "recorded" or not records_path.exists() or not probe_path.exists():
            continue
        records = load_records(records_path)
        layer = PIKProbe.load(probe_path).layer
        manifest = checkpoint_features(where, config.name, records, layer, args.dataset)
        if manifest is None:
            print(f"{config.name}: no features of layer {layer} yet", flush=True)
            continue
        figures[config.name] = {"layer": layer, "rows": manifest["rows"], "records": manifest["records"],
                                "complete": manifest["complete"]}
        print(f"{config.name}: layer {layer}, features for {manifest['rows']} of {manifest['records']} records "
              f"-> {where.hidden_dir(args.dataset) / config.name}", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
