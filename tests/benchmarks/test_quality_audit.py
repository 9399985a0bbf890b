"""The family's tokenizer tokenizes the same once saved into a checkpoint and loaded back (the issue-6 family's
did not: RESULTS.md), and the audit's overlap measure."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import audit  # noqa: E402
from benchmarks.quality.family import FamilyConfig, model_config, saved_tokenizer, train_tokenizer  # noqa: E402

CODE = ["def f(x):\n    if x > 10:\n        return [x, 2024]\n\n\n    return None\n" * 3,
        "class A:\n    \"\"\"Doc.\"\"\"\n\n    def g(self):\n            pass\n\t\n" * 3,
        "Section 12.3  The   licensee\n\n   shall (a) keep    notices.\n" * 3]


def test_family_tokenizer_round_trips_through_a_checkpoint(tmp_path):
    cfg = FamilyConfig.preset("toy")
    loaded = saved_tokenizer(train_tokenizer(CODE, 300), model_config(cfg, 300), tmp_path / "new", CODE)
    ids = loaded("    return 12345\n\n\n", add_special_tokens=False)["input_ids"]
    assert len([i for i in ids if loaded.decode([i]).isdigit()]) == 5  # one token per digit
    assert loaded.decode(ids) == "    return 12345\n\n\n"
    # the issue-6 recipe does not survive the round trip: whitespace runs tokenize differently once loaded
    with pytest.raises(ValueError, match="differently"):
        saved_tokenizer(audit.legacy_tokenizer(CODE, 300), model_config(cfg, 300), tmp_path / "old", CODE)


def test_overlap_counts_shingles_and_lines():
    ref = ["one two three four five six seven eight nine ten\nthis line is long enough to be counted here"]
    test = ["one two three four five six seven eight nine\nthis line is long enough to be counted here\nnew"]
    got = audit.overlap(test, ref)
    # 12 shingles of 8 words; those inside "one .. nine" (2) and inside the long line (2) are in the reference
    assert got["shingles8"] == pytest.approx(4 / 12)
    assert got["lines30"] == 0.5  # of its two lines of >= 30 characters, the second is in the reference
    assert audit.overlap(test, []) == {"shingles8": 0.0, "lines30": 0.0}
