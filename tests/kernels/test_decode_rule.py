"""`_configs.decode_mode` against what it was fitted to: the H200 timings of every tile mode forced in turn
(benchmarks/bench_decode.py; benchmarks/results/runtime/decode-h200*.json, the fit and two later runs). A rule
change that picks a mode measured more than 5% slower than the best one on any row fails here."""
import json
from pathlib import Path

import pytest

from symphony_kernels import _configs

RUNS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "runtime").glob("decode-h200*.json"))
SHAPES = {"qwen3-30b-a3b": 128, "qwen3-next": 512, "mixtral-8x7b": 8, "qwen2-0.5b-x4": 4}  # experts per shape


def _rows():
    return [dict(row, run=path.stem) for path in RUNS for row in json.loads(path.read_text())["rows"]]


def test_the_measurements_cover_every_mode_and_shape():
    rows = _rows()
    assert len(RUNS) >= 3 and {r["shape"] for r in rows} == set(SHAPES)
    assert all(any(f"mode{m}_us" in r for r in rows) for m in (0, 1, 2))


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['run']}-{r['shape']}-T{r['T']}")
def test_rule_picks_a_mode_within_5_percent_of_the_fastest(row):
    mode = _configs.decode_mode(row["pairs"], SHAPES[row["shape"]])
    times = {m: row[f"mode{m}_us"] for m in (0, 1, 2) if f"mode{m}_us" in row}
    assert mode in times, f"the rule picks mode {mode}, which was not timed"
    assert times[mode] <= 1.05 * min(times.values()), (mode, times)


@pytest.mark.parametrize("S,E", [(1, 1), (8, 1024), (64, 8), (256, 1), (300, 1024), (257, 1024)])
def test_masked_tiles_stay_within_their_row_budget(S, E):
    mode = _configs.decode_mode(S, E)
    if mode == 1:
        assert E * _configs.decode_bm(S) <= _configs.DECODE_MAX_ROWS
    if mode == 2:
        assert S * _configs.PAIR_ROWS_MIN_RATIO <= E and S <= _configs.PAIR_ROWS_MAX_PAIRS
