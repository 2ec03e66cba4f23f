"""Golden numbers: small fixed two-fold runs give exactly the per-neuron tables and layer metrics
stored in tests/golden/two_fold.json (written by the code at the commit recorded in the file: the
geometry-controlled defaults, cross-fitted core tokens, the gap statistic's K and the sequential
top-segment p, with 16 pseudo-neurons per layer).

Last regenerated, on purpose, for the corpus intervals: new metrics only (`*_ci_low`, `*_ci_high`;
every value already in the file unchanged within 1e-6 relative, with the profile now the merge of
ten corpus blocks and the pseudo-neurons' calibration folded into their read-in). Before that, for
the calibrated geometry null (empirical p with a GPD tail, the
null matched in selectivity, its self-calibration and the headlines' pseudo values and excesses:
new metrics), surface variants merged into one core unit (fewer, pooled core tokens: the default
case now analyses 1 neuron of layer 0 instead of 9) and the gap statistic's references drawn from
the vectors' principal components (K). Before that, for the lean extraction engine: every
integer, string, core token, K and category was unchanged; real-neuron statistics moved by at most
2.3e-7 relative (type tables reduced per batch in float32 before their float64 sums) and what is
derived from them by at most 4e-5 (a segment's mean near zero; 1e-5 otherwise); the geometry comparisons (`*_geometry`, `*_excess`, the
pseudo-neurons' rows) moved by up to their own size, because the pseudo-neurons are now calibrated
on windows strided across the corpus rather than on its first batch. The second case's
`clustering=kmeans` became `clustering=kmeans_silhouette` when the `kmeans` preset took the default
K rule: the preset it was written with, renamed, not a change of numbers.

Floats are compared at a relative tolerance of RTOL (absolute ATOL near zero): another CPU or
another BLAS, numpy or scipy build in the lock's range moves the last few bits of a float (seen:
3 units in the last place of a 1e-4 mean), never the sixth digit. Integers, strings, NaN positions,
column names and row order are compared exactly. `INTRANEURON_GOLDEN_EXACT=1` asks for bit-identical
floats, for a refactor checked on the machine that wrote the file.

Regenerate only for a change that is meant to change the numbers:
    .venv/bin/python -m tests.test_golden --write
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from intraneuron.reports.artifacts import load_summary, load_table

GOLDEN = Path(__file__).parent / "golden" / "two_fold.json"
TABLES = ("neurons", "categories", "segments", "pairs")
CASES = json.loads(GOLDEN.read_text())["cases"]


def observed(summary, client) -> dict:
    """Layer aggregates (the summary table, timings excluded) and tables of a finished job, in the
    golden file's layout (which keeps the metric keys the runs had when it was written)."""
    metrics, tables = {}, {}
    for layer in summary.layers:
        for key, value in load_summary(client, summary.run_id, layer).items():
            if not key.endswith("seconds"):
                metrics[f"layer_{layer}/{key}"] = value
        for name in TABLES:
            try:
                frame = load_table(client, summary.run_id, layer, name)
            except Exception:  # an empty table is not logged
                continue
            rows = [[v.item() if hasattr(v, "item") else v for v in row] for row in frame.itertuples(index=False)]
            tables[f"layer_{layer}/{name}"] = {"columns": [str(c) for c in frame.columns], "data": rows}
    return {"metrics": metrics, "tables": tables}


RTOL, ATOL = 1e-9, 1e-12
EXACT = os.environ.get("INTRANEURON_GOLDEN_EXACT") == "1"


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if EXACT else math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    return a == b


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_two_fold_analysis_reproduces_the_golden_numbers(case, run_job):
    expected = CASES[case]
    got = observed(*run_job(*expected["overrides"]))
    assert sorted(got["metrics"]) == sorted(expected["metrics"])
    differing = [k for k, v in expected["metrics"].items() if not same(v, got["metrics"][k])]
    assert not differing, {k: (expected["metrics"][k], got["metrics"][k]) for k in differing[:10]}
    assert sorted(got["tables"]) == sorted(expected["tables"])
    for name, table in expected["tables"].items():
        mine = got["tables"][name]
        assert mine["columns"] == table["columns"], name
        assert len(mine["data"]) == len(table["data"]), name
        for row_mine, row_gold in zip(mine["data"], table["data"], strict=True):
            bad = [c for c, x, y in zip(table["columns"], row_mine, row_gold, strict=True) if not same(x, y)]
            assert not bad, (name, row_gold[:2], {c: (row_gold[table["columns"].index(c)],
                                                     row_mine[table["columns"].index(c)]) for c in bad})
    assert np.isfinite([v for v in got["metrics"].values() if isinstance(v, float)]).any()


def write_golden() -> None:
    """Rerun every case with the code checked out now and store its numbers with the commit."""
    import subprocess
    import tempfile

    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from intraneuron.cli import run_job
    from intraneuron.paths import CONF_DIR

    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["INTRANEURON_CACHE"] = f"{tmp}/cache"
        for name, case in CASES.items():
            uri = f"sqlite:///{tmp}/{name}.db"
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*case["overrides"], f"tracking.tracking_uri={uri}"])
            cases[name] = {"overrides": case["overrides"], **observed(run_job(cfg), MlflowClient(uri))}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    GOLDEN.write_text(json.dumps({"commit": commit, "cases": cases}, sort_keys=True, separators=(",", ":")))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    write_golden()
