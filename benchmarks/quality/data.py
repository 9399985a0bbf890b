"""Offline text for the quality study: training domains and held-out (out-of-distribution) domains, extracted
from what a Debian machine with Python has, cleaned, de-duplicated and split train/validation/test.

    python benchmarks/quality/data.py --out benchmarks/quality/data          # the study's data (Debian packages)
    python benchmarks/quality/data.py --out DIR --toy                        # small, from Python's stdlib only

The full set needs `apt-get install -y bible-kjv dict-gcide dict-foldoc dict-jargon` (SOURCES.md lists the
sources and their licenses). The toy set needs nothing beyond Python itself; the toy run of the study uses it.

Every domain is a list of documents (a Bible chapter, a source file, a group of dictionary entries, one math
problem, a license file). Documents are normalised (tabs and trailing spaces, at most one blank line in a row),
exact duplicates (after collapsing whitespace) are dropped, so no text lands in two splits; for dictionary and
legal text repeated paragraphs are dropped as well (license texts are copied into hundreds of copyright files).
Every document gets a rank from a hash of (seed, domain, its text); documents are taken in rank order up to the
domain's byte cap, the first ones go to the test split until it holds `test_fraction` of the bytes, the next to
validation, the rest to train. The result depends on nothing but the source texts and the seed.

Layout written to --out (each split a JSON-lines file, one JSON string per document):

    manifest.json                          domains, roles (train / ood), sources, split sizes, sha256 of each file
    <domain>/train.jsonl  val.jsonl  test.jsonl
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import mathgen  # noqa: E402

SPLITS = ("train", "val", "test")
ROLES = ("train", "ood")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(RuntimeError):
    """A source of a domain is missing or unusable (the message says what to install)."""


@dataclass(frozen=True)
class Domain:
    name: str
    role: str                       # "train": the family trains on it; "ood": evaluation only
    source: str                     # one line for the manifest and SOURCES.md
    extract: Callable[[], list[str]]  # the documents, uncapped
    max_bytes: int                  # cap on the UTF-8 bytes taken
    paragraph_dedup: bool = False   # drop paragraphs already seen earlier in the domain
    max_doc_bytes: int | None = None  # cut longer documents at blank lines into pieces of about this size


# ---------------------------------------------------------------------------------------------------- cleaning

def normalise(text: str) -> str:
    """Tabs to 4 spaces, no trailing spaces, no \\r, at most one blank line in a row, no blank first/last line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _key(text: str) -> str:
    return " ".join(text.split())


def dedup_documents(docs: list[str], *, paragraphs: bool = False, min_paragraph: int = 40) -> list[str]:
    """Drop exact duplicates (whitespace-insensitive), keeping the first; with `paragraphs`, also drop every
    paragraph (blank-line separated, at least `min_paragraph` characters) seen before, and documents left empty."""
    seen_docs, seen_pars, out = set(), set(), []
    for doc in docs:
        if paragraphs:
            kept = []
            for par in doc.split("\n\n"):
                k = _key(par)
                if len(k) >= min_paragraph:
                    if k in seen_pars:
                        continue
                    seen_pars.add(k)
                kept.append(par)
            doc = "\n\n".join(kept).strip("\n")
        k = _key(doc)
        if not k or k in seen_docs:
            continue
        seen_docs.add(k)
        out.append(doc)
    return out


def chunk_documents(docs: list[str], max_doc_bytes: int) -> list[str]:
    """Documents longer than `max_doc_bytes` cut at blank lines into consecutive pieces of at most about that size
    (a single paragraph longer than that stays whole)."""
    out = []
    for doc in docs:
        if len(doc.encode()) <= max_doc_bytes:
            out.append(doc)
            continue
        piece, size = [], 0
        for par in doc.split("\n\n"):
            n = len(par.encode()) + 2
            if piece and size + n > max_doc_bytes:
                out.append("\n\n".join(piece))
                piece, size = [], 0
            piece.append(par)
            size += n
        if piece:
            out.append("\n\n".join(piece))
    return out


def _rank(seed: int, domain: str, doc: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{domain}\x00{_key(doc)}".encode()).digest()


def split_documents(docs: list[str], domain: str, *, seed: int, max_bytes: int, val_fraction: float,
                    test_fraction: float) -> dict[str, list[str]]:
    """Documents in hash-rank order, capped at `max_bytes` (a document that would pass the cap is skipped, smaller
    ones after it may still fit); test gets the first `test_fraction` of the bytes,
    validation the next `val_fraction`, train the rest. Each split with documents gets at least one."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    ranked = sorted(docs, key=lambda d: _rank(seed, domain, d))
    taken, total = [], 0
    for doc in ranked:
        size = len(doc.encode())
        if total + size > max_bytes:
            continue
        taken.append(doc)
        total += size
    if len(taken) < 3:
        raise DataError(f"domain {domain!r} has {len(taken)} documents; at least 3 are needed for three splits")
    splits = {s: [] for s in SPLITS}
    done = 0
    for doc in taken:
        if done < test_fraction * total or not splits["test"]:
            split = "test"
        elif done < (test_fraction + val_fraction) * total or not splits["val"]:
            split = "val"
        else:
            split = "train"
        splits[split].append(doc)
        done += len(doc.encode())
    if not splits["train"]:  # tiny domains: give train the last document
        splits["train"].append(splits["val"].pop() if len(splits["val"]) > 1 else splits["test"].pop())
    return splits


# ------------------------------------------------------------------------------------------------- extractors

def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
              "__pycache__", "lib2to3", "ensurepip", "turtledemo"}


def python_sources(max_file_bytes: int = 200_000) -> list[str]:
    """The Python files of the running interpreter's standard library, tests and data tables left out."""
    root = _stdlib()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or path.stat().st_size > max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = normalise(text)
        if len(text) >= 200:
            docs.append(text)
    if not docs:
        raise DataError(f"no Python sources found under {root}")
    return docs


def math_problems(target_bytes: int, seed: int = 0) -> list[str]:
    """Generated problems (mathgen), about `target_bytes` of them."""
    return mathgen.problems(max(10, target_bytes // 85), seed=seed)


def kjv_chapters(program: str = "bible") -> list[str]:
    """The King James Bible (Debian's bible-kjv), one document per chapter: its title, then one verse per line."""
    exe = shutil.which(program)
    if exe is None:
        raise DataError("the `bible` program is missing: apt-get install -y bible-kjv")
    out = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    lines = out.split("\n")
    chapters, title, verses = [], None, []
    for i, line in enumerate(lines):
        blank_around = (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if blank_around and re.match(r"^(\d )?[A-Z][A-Za-z ]+ \d+$", line):
            if title and verses:
                chapters.append(title + "\n" + "\n".join(verses))
            title, verses = line, []
        elif verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if title and verses:
        chapters.append(title + "\n" + "\n".join(verses))
    if len(chapters) < 1000:
        raise DataError(f"`bible` printed {len(chapters)} chapters, expected 1189")
    return chapters


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def dictd_entries(name: str, folder: str = "/usr/share/dictd") -> list[str]:
    """The entries of a dictd dictionary (NAME.index + NAME.dict.dz), in file order, headers left out."""
    index, data = Path(folder) / f"{name}.index", Path(folder) / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise DataError(f"dictionary {name} is missing ({data}): apt-get install -y dict-{name}")
    raw = gzip.decompress(data.read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.add((_b64(parts[1]), _b64(parts[2])))
    return [raw[o:o + n].decode("utf-8", errors="replace") for o, n in sorted(spans)]


_GCIDE_NOISE = re.compile(r"^\s*\[(1913 Webster|WordNet[^\]]*|PJC|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]\s*$",
                          re.M)


def clean_gcide(entry: str) -> str:
    """A GCIDE entry as plain prose: no pronunciation marks (\\...\\), braces or source tags."""
    entry = _GCIDE_NOISE.sub("", entry)
    entry = re.sub(r"\s*\\[^\\\n]*\\", "", entry).replace("{", "").replace("}", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", entry)]
    return "\n".join(p for p in paragraphs if p)


def clean_definition(entry: str) -> str:
    """A FOLDOC / Jargon File entry: braces (cross-reference marks) dropped, paragraphs re-flowed."""
    entry = entry.replace("{", "").replace("}", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", entry)]
    return "\n\n".join(p for p in paragraphs if p)


def _groups(items: list[str], size: int, sep: str) -> list[str]:
    return [sep.join(items[i:i + size]) for i in range(0, len(items), size)]


def prose() -> list[str]:
    """KJV chapters and GCIDE definitions (groups of 25 consecutive entries)."""
    gcide = [e for e in map(clean_gcide, dictd_entries("gcide")) if len(e) > 40]
    return kjv_chapters() + _groups(gcide, 25, "\n\n")


def computing() -> list[str]:
    """FOLDOC and the Jargon File: computing definitions, groups of 10 consecutive entries."""
    entries = [clean_definition(e) for name in ("foldoc", "jargon") for e in dictd_entries(name)]
    return _groups([e for e in entries if len(e) > 40], 10, "\n\n")


def legal_texts(roots=("/usr/share/common-licenses",), copyright_glob: str | None = "/usr/share/doc/*/copyright"
                ) -> list[str]:
    """License texts and Debian copyright files (symbolic links skipped)."""
    paths = []
    for root in roots:
        if Path(root).is_dir():
            paths += sorted(p for p in Path(root).iterdir() if p.is_file() and not p.is_symlink())
    if copyright_glob:
        paths += sorted(Path(p) for p in glob.glob(copyright_glob) if not Path(p).is_symlink())
    docs = []
    for p in paths:
        try:
            docs.append(normalise(p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    if not docs:
        raise DataError(f"no license texts found under {', '.join(roots)}")
    return docs


def python_docs() -> list[str]:
    """The reference-manual topics shipped with the stdlib (pydoc_data): English technical prose."""
    from pydoc_data.topics import topics

    return [normalise(topics[k]) for k in sorted(topics)]


def stdlib_license() -> list[str]:
    """Python's own LICENSE.txt (split into its sections) and, where present, Debian's common licenses."""
    docs = legal_texts(copyright_glob=None) if Path("/usr/share/common-licenses").is_dir() else []
    lic = _stdlib() / "LICENSE.txt"
    if lic.is_file():
        paragraphs = normalise(lic.read_text(encoding="utf-8")).split("\n\n")
        docs += _groups(paragraphs, 4, "\n\n")
    if not docs:
        raise DataError("no license text found (neither /usr/share/common-licenses nor the stdlib's LICENSE.txt)")
    return docs


MB = 1_000_000


def full_domains(seed: int = 0) -> list[Domain]:
    """The study's domains: prose, code, math for training; computing and legal held out (OOD)."""
    return [
        Domain("prose", "train", "King James Bible (Debian bible-kjv) + GCIDE dictionary definitions (dict-gcide)",
               prose, int(6.5 * MB), paragraph_dedup=True),
        Domain("code", "train", "CPython standard library sources of the running interpreter (tests left out)",
               python_sources, int(6.5 * MB), max_doc_bytes=16_000),
        Domain("math", "train", "generated arithmetic/algebra word problems with exact answers (mathgen.py)",
               lambda: math_problems(int(6.6 * MB), seed), int(6.5 * MB)),
        Domain("computing", "ood", "FOLDOC (dict-foldoc) + the Jargon File (dict-jargon)", computing,
               int(3 * MB), paragraph_dedup=True),
        Domain("legal", "ood", "/usr/share/common-licenses + /usr/share/doc/*/copyright", legal_texts,
               int(3 * MB), paragraph_dedup=True, max_doc_bytes=16_000),
    ]


def toy_domains(seed: int = 0) -> list[Domain]:
    """Small domains from Python itself, so the toy study runs on any machine."""
    return [
        Domain("prose", "train", "Python reference-manual topics (stdlib pydoc_data)", python_docs, 120_000,
               max_doc_bytes=4000),
        Domain("code", "train", "CPython standard library sources", python_sources, 120_000, max_doc_bytes=4000),
        Domain("math", "train", "generated problems (mathgen.py)", lambda: math_problems(130_000, seed), 120_000),
        Domain("legal", "ood", "Python's LICENSE.txt (+ /usr/share/common-licenses if present)", stdlib_license,
               60_000, paragraph_dedup=True, max_doc_bytes=4000),
    ]


# ---------------------------------------------------------------------------------------------------- writing

def prepare(out_dir, *, toy: bool = False, seed: int = 0, val_fraction: float | None = None,
            test_fraction: float | None = None, progress: bool = True, domains: list[Domain] | None = None,
            layout: str = "issue6") -> dict:
    """Extract, clean, de-duplicate and split every domain into `out_dir` (written to a temporary folder and
    renamed at the end; an existing `out_dir` is replaced). Returns the manifest. `domains`: other domains than
    the study's (`layout` names them in the manifest; paperdata.py uses it)."""
    val_fraction = val_fraction if val_fraction is not None else (0.1 if toy else 0.03)
    test_fraction = test_fraction if test_fraction is not None else (0.15 if toy else 0.03)
    out_dir = Path(out_dir)
    if domains is None:
        domains = toy_domains(seed) if toy else full_domains(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = {"format": FORMAT_VERSION, "layout": layout, "toy": toy, "seed": seed, "val_fraction": val_fraction,
                    "test_fraction": test_fraction, "python": sys.version.split()[0], "domains": {}}
        for d in domains:
            docs = [normalise(x) for x in d.extract()]
            if d.max_doc_bytes:
                docs = chunk_documents(docs, d.max_doc_bytes)
            docs = dedup_documents(docs, paragraphs=d.paragraph_dedup)
            splits = split_documents(docs, d.name, seed=seed, max_bytes=d.max_bytes, val_fraction=val_fraction,
                                     test_fraction=test_fraction)
            entry = {"role": d.role, "source": d.source, "documents_available": len(docs), "splits": {}}
            (tmp / d.name).mkdir()
            for split, items in splits.items():
                path = tmp / d.name / f"{split}.jsonl"
                payload = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items).encode()
                path.write_bytes(payload)
                entry["splits"][split] = {"documents": len(items), "bytes": sum(len(x.encode()) for x in items),
                                          "sha256": hashlib.sha256(payload).hexdigest()}
            manifest["domains"][d.name] = entry
            if progress:
                sizes = ", ".join(f"{s} {v['bytes'] / MB:.2f} MB ({v['documents']} docs)"
                                  for s, v in entry["splits"].items())
                print(f"{d.name:>10} [{d.role}]: {sizes}", flush=True)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------- reading

def read_manifest(data_dir) -> dict:
    """The manifest of a prepared data folder; DataError if the folder is not one."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data folder (no {MANIFEST}): run "
                        f"`python benchmarks/quality/data.py --out {data_dir}` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {manifest.get('format')}, expected {FORMAT_VERSION}: prepare it again")
    return manifest


def domains_with_role(manifest: dict, role: str) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return [name for name, d in manifest["domains"].items() if d["role"] == role]


def load_split(data_dir, domain: str, split: str, *, max_bytes: int | None = None) -> list[str]:
    """The documents of one split (in file order), optionally only the first ones up to `max_bytes`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    manifest = read_manifest(data_dir)
    if domain not in manifest["domains"]:
        raise DataError(f"no domain {domain!r} in {data_dir}; it has {', '.join(manifest['domains'])}")
    docs, total = [], 0
    with open(Path(data_dir) / domain / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if max_bytes is not None and docs and total + len(doc.encode()) > max_bytes:
                break
            docs.append(doc)
            total += len(doc.encode())
    return docs


def main(argv=None, *, prepare_fn=None, description: str | None = None) -> int:
    """The command line of this module, and of paperdata.py (its `prepare_fn` and docstring)."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="data folder to write (replaced if present)")
    parser.add_argument("--toy", action="store_true", help="small domains from Python's stdlib only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = (prepare_fn or prepare)(args.out, toy=args.toy, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(s["bytes"] for d in manifest["domains"].values() for s in d["splits"].values())
    print(f"wrote {args.out}: {total / MB:.1f} MB of text in {len(manifest['domains'])} domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
