"""Text for the paper-protocol study (issue 13): four training domains, as the paper's four sources have (general,
math, code, science), and one held-out domain, prepared with data.py's cleaning, de-duplication and splits.

    python benchmarks/quality/paperdata.py --out benchmarks/quality/data-paper          # Debian packages needed
    python benchmarks/quality/paperdata.py --out DIR --toy                              # Python's stdlib only

Full set (after `apt-get install -y bible-kjv dict-gcide dict-foldoc dict-jargon`): prose (KJV + GCIDE: the
general domain, the anchor's), math (generated problems), code (CPython's standard library, tests left out), and
computing (FOLDOC + the Jargon File: technical definitions, the fourth source's domain, standing in for the
paper's science QA) for training; legal text held out (the paper's medicine). The domains are larger than the
issue-6 study's (caps below), so that the larger family repeats its text less often.
Toy set: data.py's toy prose, code and math, the text files shipped with IDLE (release notes, README, TODO) as
the fourth domain, and Python's license as the held-out one.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import data as qdata  # noqa: E402

MB = qdata.MB
# which training domain each of the paper's sources takes (the first is the anchor's)
ROLES = {"full": {"general": "prose", "math": "math", "code": "code", "fourth": "computing"},
         "toy": {"general": "prose", "math": "math", "code": "code", "fourth": "notes"}}


def idle_notes() -> list[str]:
    """IDLE's release notes, history, README, TODO and extension notes (English technical prose), cut into
    groups of 6 paragraphs."""
    folder = qdata._stdlib() / "idlelib"
    paragraphs = []
    for name in ("NEWS.txt", "NEWS2x.txt", "HISTORY.txt", "README.txt", "TODO.txt", "extend.txt", "CREDITS.txt"):
        path = folder / name
        if path.is_file():
            paragraphs += [p for p in qdata.normalise(path.read_text(encoding="utf-8", errors="replace")).split("\n\n")
                           if p.strip()]
    if not paragraphs:
        raise qdata.DataError(f"no IDLE text files under {folder}")
    return qdata._groups(paragraphs, 6, "\n\n")


def domains(toy: bool, seed: int = 0) -> list[qdata.Domain]:
    if toy:
        prose, code, math, legal = qdata.toy_domains(seed)
        notes = qdata.Domain("notes", "train", "IDLE's text files (stdlib idlelib: NEWS, HISTORY, README, ...)",
                             idle_notes, 120_000, max_doc_bytes=4000)
        return [prose, math, code, notes, legal]
    D = qdata.Domain
    return [
        D("prose", "train", "King James Bible (Debian bible-kjv) + GCIDE dictionary definitions (dict-gcide)",
          qdata.prose, 9 * MB, paragraph_dedup=True),
        D("math", "train", "generated arithmetic/algebra word problems with exact answers (mathgen.py)",
          lambda: qdata.math_problems(int(9.2 * MB), seed), 9 * MB),
        D("code", "train", "CPython standard library sources of the running interpreter (tests left out)",
          qdata.python_sources, 12 * MB, max_doc_bytes=16_000),
        D("computing", "train", "FOLDOC (dict-foldoc) + the Jargon File (dict-jargon)", qdata.computing, 9 * MB,
          paragraph_dedup=True),
        D("legal", "ood", "/usr/share/common-licenses + /usr/share/doc/*/copyright", qdata.legal_texts, 3 * MB,
          paragraph_dedup=True, max_doc_bytes=16_000),
    ]


def prepare(out_dir, *, toy: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """data.prepare with the paper layout's domains (manifest layout "paper")."""
    return qdata.prepare(out_dir, toy=toy, seed=seed, progress=progress, domains=domains(toy, seed), layout="paper")


def roles(manifest: dict) -> dict[str, str]:
    """{"general": domain, "math": ..., "code": ..., "fourth": ...} of a prepared paper-layout data folder."""
    if manifest.get("layout") != "paper":
        raise qdata.DataError("the data folder is not of the paper layout: prepare it with "
                              "`python benchmarks/quality/paperdata.py --out DIR`")
    out = ROLES["toy" if manifest.get("toy") else "full"]
    missing = [d for d in out.values() if manifest["domains"].get(d, {}).get("role") != "train"]
    if missing:
        raise qdata.DataError(f"the data folder has no training domain {missing[0]!r}")
    return dict(out)


def main(argv=None) -> int:
    return qdata.main(argv, prepare_fn=prepare, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
