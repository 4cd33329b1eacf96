"""Where records, features, probes and policy files live: one function, environment overrides honoured.

The CLI, the app and the servers all ask `locations()`, so `$CASCADE_RESULTS_DIR` (and the
other variables below) mean the same thing everywhere. Precedence, per folder: an explicit
argument (a CLI flag), then the environment variable, then the repository's `data/` folder.
Features have one more rule, kept from the app: a custom results folder from the environment
puts them beside it (`<results>/../features`), so a test or a scratch run never writes
hidden states into the repository.

This module imports nothing from the project, so the preset loader can use `REPO_ROOT` too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"

RESULTS_ENV = "CASCADE_RESULTS_DIR"
FEATURES_ENV = "CASCADE_FEATURES_DIR"
PROBES_ENV = "CASCADE_PROBES_DIR"
POLICIES_ENV = "CASCADE_POLICIES_DIR"
HIDDEN_ENV = "CASCADE_HIDDEN_DIR"
ENV_VARS = (RESULTS_ENV, FEATURES_ENV, PROBES_ENV, POLICIES_ENV, HIDDEN_ENV)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


@dataclass(frozen=True)
class Locations:
    """The folders of one run; the `*_path` methods name one stage's files inside them."""

    results: Path   # <results>/<dataset>/<stage>.parquet: benchmark records
    features: Path  # <features>/<dataset>/<stage>/chunk-*.npz: hidden states (local, not committed)
    hidden: Path    # data/hidden/ (beside other records: <results>/../hidden): single-layer features to commit
    probes: Path    # <probes>/<stage>.npz when the preset names no probe file
    policies: Path  # policy files written by `calibrate`

    def record_path(self, stage: str, dataset: str = "mmlu") -> Path:
        """Where the benchmark writes (and everything reads) one stage's records."""
        return self.results / dataset / f"{stage}.parquet"

    def features_dir(self, stage: str, dataset: str = "mmlu") -> Path:
        """The folder of one stage's feature chunks."""
        return self.features / dataset / stage

    def hidden_dir(self, dataset: str = "mmlu") -> Path:
        return self.hidden / dataset

    def probe_path(self, config, dataset: str = "mmlu") -> Path:
        """A stage's probe file: for MMLU the preset's `probe` key, else `<probes>/<stage>.npz`; for
        any other dataset `<probes>/<dataset>/<stage>.npz` (a probe learns one kind of question:
        an arithmetic probe must never replace the MMLU one the preset names)."""
        if dataset != "mmlu":
            return self.probes / dataset / f"{config.name}.npz"
        return config.probe_path() or self.probes / f"{config.name}.npz"

    @property
    def is_default_results(self) -> bool:
        """True when the records are the repository's own (docs/RESULTS.md describes those)."""
        return self.results.resolve() == (DATA_DIR / "results").resolve()


def locations(results_dir: Path | str | None = None, features_dir: Path | str | None = None,
              probes_dir: Path | str | None = None, policies_dir: Path | str | None = None) -> Locations:
    """The folders to use: explicit arguments, else the environment, else the repository's data/."""
    env_results = _env_path(RESULTS_ENV)
    results = Path(results_dir) if results_dir else env_results or DATA_DIR / "results"
    if features_dir:
        features = Path(features_dir)
    else:
        features = _env_path(FEATURES_ENV) or (env_results.parent / "features" if env_results
                                               else DATA_DIR / "features")
    probes = Path(probes_dir) if probes_dir else _env_path(PROBES_ENV) or DATA_DIR / "probes"
    policies = Path(policies_dir) if policies_dir else _env_path(POLICIES_ENV) or DATA_DIR / "policies"
    # The committed layer belongs to the committed records: other records keep theirs beside them.
    default_results = results.resolve() == (DATA_DIR / "results").resolve()
    hidden = _env_path(HIDDEN_ENV) or (DATA_DIR / "hidden" if default_results else results.parent / "hidden")
    return Locations(results=results, features=features, hidden=hidden, probes=probes, policies=policies)


RESULTS_DOC = REPO_ROOT / "docs" / "RESULTS.md"
