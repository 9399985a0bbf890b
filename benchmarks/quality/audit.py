"""What the study's models read, checked on a CPU: tokenization as trained vs as loaded, what stage 2 reads, and
how much of each test split is in the training text (issue 13, item 5).

    python benchmarks/quality/audit.py --data benchmarks/quality/data --json audit.json \\
        [--results benchmarks/quality/results/results.json]

1. Tokenization. The family trains its tokenizer in memory and saves it into every checkpoint; every evaluation
   and stage 2 load it back (symphony.data.load_tokenizer). For the issue-6 recipe (`legacy_tokenizer`: digits +
   GPT-2 byte-level pre-tokenization) and for today's (`family.train_tokenizer`: Qwen2's), the token count of
   every split as trained and as loaded from a qwen2 checkpoint folder. With --results, the per-domain token
   counts that the issue-6 study recorded for its test loss are compared with both (the loss is over
   count - windows predicted tokens: windows of `eval_seq_len`, the last one shorter).
2. Stage 2's text: the first `router_text_bytes` of each training domain's train split (study.prepare_texts),
   its tokens, windows of `router_seq_len` and the passes that `router_steps` x `router_batch_size` windows make
   over them.
3. Overlap with the test split: the share of each test split's 8-word shingles, and of its lines of >= 30
   characters, that occur in the train split and in stage 2's text.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import data as qdata  # noqa: E402
from benchmarks.quality.family import FamilyConfig, bpe_tokenizer, model_config, train_tokenizer  # noqa: E402


def legacy_tokenizer(texts: list[str], vocab_size: int):
    """The issue-6 family's tokenizer recipe (digits one per token, then GPT-2 byte-level pre-tokenization)."""
    from tokenizers import pre_tokenizers

    return bpe_tokenizer(texts, vocab_size, pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))


def reload(tokenizer, cfg: FamilyConfig):
    """`tokenizer` saved into a qwen2 checkpoint folder (config + tokenizer files) and loaded back as the study
    loads it."""
    from symphony.data import load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        model_config(cfg, cfg.vocab_size).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return load_tokenizer(folder)


def tokenization(data_dir, cfg: FamilyConfig, recipe) -> dict:
    """{"loaded_class", domain: {split: {"trained": n, "loaded": n}}} for a tokenizer made by `recipe` as the
    family makes it (on up to `tokenizer_bytes` of each training domain's train split)."""
    from symphony.data import token_stream

    manifest = qdata.read_manifest(data_dir)
    train = qdata.domains_with_role(manifest, "train")
    sample = [doc for d in train for doc in qdata.load_split(data_dir, d, "train", max_bytes=cfg.tokenizer_bytes)]
    trained = recipe(sample, cfg.vocab_size)
    loaded = reload(trained, cfg)
    out = {"loaded_class": type(loaded).__name__}
    for d in manifest["domains"]:
        out[d] = {}
        for split in qdata.SPLITS:
            docs = qdata.load_split(data_dir, d, split)
            out[d][split] = {"trained": token_stream(trained, docs).numel(), "loaded": token_stream(loaded, docs).numel()}
    return out, loaded


def _shingles(text: str, n: int = 8) -> set:
    w = text.split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def _lines(text: str, min_chars: int = 30) -> set:
    return {s for s in (line.strip() for line in text.split("\n")) if len(s) >= min_chars}


def overlap(test: list[str], reference: list[str]) -> dict:
    """Share of the test documents' 8-word shingles and long lines found in the reference documents."""
    out = {}
    for key, fn in (("shingles8", _shingles), ("lines30", _lines)):
        ref = set().union(*map(fn, reference)) if reference else set()
        total = found = 0
        for doc in test:
            items = fn(doc)
            total += len(items)
            found += len(items & ref)
        out[key] = found / total if total else 0.0
    return out


def stage2_reading(data_dir, tokenizer, settings) -> dict:
    """Per training domain: the bytes and tokens of stage 2's text, the test split's overlap with it and with the
    whole train split; overall: windows and passes over them."""
    from symphony.data import token_stream

    manifest = qdata.read_manifest(data_dir)
    out, docs_all = {"domains": {}}, []
    for d in qdata.domains_with_role(manifest, "train"):
        docs = qdata.load_split(data_dir, d, "train", max_bytes=settings.router_text_bytes)
        docs_all += docs
        test = qdata.load_split(data_dir, d, "test", max_bytes=settings.test_bytes)
        out["domains"][d] = {"documents": len(docs), "bytes": sum(len(x.encode()) for x in docs),
                             "tokens": token_stream(tokenizer, docs).numel(),
                             "test_in_stage2_text": overlap(test, docs),
                             "test_in_train_split": overlap(test, qdata.load_split(data_dir, d, "train"))}
    tokens = token_stream(tokenizer, docs_all).numel()
    windows = tokens // settings.router_seq_len
    read = settings.router_steps * settings.router_batch_size
    out.update(tokens=tokens, windows=windows, windows_read=read, passes=read / max(1, windows))
    return out


def recorded_counts(results: dict, tok: dict) -> dict:
    """Per domain: the predicted-token count the study recorded for its test loss, and the count that the trained
    and the loaded tokenization give (count - windows of eval_seq_len)."""
    seq = results["settings"]["eval_seq_len"]
    first = next(e for e in results["contenders"].values() if e.get("runs"))["runs"][0]["tokens"]
    out = {}
    for d, recorded in first.items():
        counts = tok[d]["test"]
        out[d] = {"recorded": recorded, **{k: n - math.ceil(n / seq) for k, n in counts.items()}}
    return out


def per_byte(results: dict, family: dict, tok: dict, manifest: dict) -> dict:
    """Losses per byte (nats), comparable across tokenizations: for every family member the validation loss that
    the family recorded (trained tokenization) and the test loss that the study recorded (loaded tokenization),
    and for the trained contenders their test loss. Predicted tokens = count - windows, as recorded."""
    val_seq = family["config"]["seq_len"]
    sizes = {d: {s: v["splits"][s]["bytes"] for s in ("val", "test")} for d, v in manifest["domains"].items()}
    recorded = recorded_counts(results, tok)
    out = {}
    for name, m in family["models"].items():
        entry = "base" if name == "base" else f"spec-{name}"
        row = {}
        for d, loss in m["val_loss"].items():
            n = tok[d]["val"]["trained"]
            row[f"{d} val (trained tok.)"] = loss * (n - math.ceil(n / val_seq)) / sizes[d]["val"]
            test = results["contenders"][entry]["summary"]["loss"][d]
            row[f"{d} test (loaded tok.)"] = test * recorded[d]["recorded"] / sizes[d]["test"]
        out[entry] = row
    for name in ("symphony", "full-post"):
        s = (results["contenders"].get(name) or {}).get("summary")
        if s:
            out[name] = {f"{d} test (loaded tok.)": s["loss"][d] * recorded[d]["recorded"] / sizes[d]["test"]
                         for d in results["data"]["train"]}
    return out


def main(argv=None) -> int:
    from benchmarks.quality.study import StudySettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared data folder (benchmarks/quality/data.py)")
    p.add_argument("--json", help="write everything measured here")
    p.add_argument("--results", help="an issue-6 results.json: compare its recorded test token counts")
    p.add_argument("--family-json", help="with --results: that study's family.json, for losses per byte")
    p.add_argument("--toy", action="store_true", help="toy family and study settings")
    args = p.parse_args(argv)
    preset = "toy" if args.toy else "gpu"
    cfg, settings = FamilyConfig.preset(preset), StudySettings.preset(preset)
    report, loaded = {"tokenization": {}}, {}
    for name, recipe in (("legacy", legacy_tokenizer), ("current", train_tokenizer)):
        report["tokenization"][name], loaded[name] = tokenization(args.data, cfg, recipe)
        t = report["tokenization"][name]
        print(f"{name} tokenizer recipe (loaded as {t['loaded_class']}): test tokens as trained -> as loaded: "
              + ", ".join(f"{d} {v['test']['trained']} -> {v['test']['loaded']}"
                          for d, v in t.items() if d != "loaded_class"))
    report["stage2"] = stage2_reading(args.data, loaded["legacy"], settings)
    s = report["stage2"]
    print(f"stage 2 text (legacy tokenizer as loaded, i.e. what the issue-6 study read): {s['tokens']} tokens, {s['windows']} windows of {settings.router_seq_len}, "
          f"{s['windows_read']} windows read = {s['passes']:.2f} passes")
    for d, v in s["domains"].items():
        print(f"  {d}: {v['bytes']} bytes, {v['tokens']} tokens; test 8-word shingles in stage-2 text "
              f"{100 * v['test_in_stage2_text']['shingles8']:.1f}%, in the train split "
              f"{100 * v['test_in_train_split']['shingles8']:.1f}%; lines {100 * v['test_in_stage2_text']['lines30']:.1f}% "
              f"/ {100 * v['test_in_train_split']['lines30']:.1f}%")
    if args.results:
        results = json.loads(Path(args.results).read_text())
        report["recorded"] = recorded_counts(results, report["tokenization"]["legacy"])
        for d, v in report["recorded"].items():
            print(f"  recorded test tokens {d}: {v['recorded']} (legacy as trained {v['trained']}, as loaded "
                  f"{v['loaded']})")
        if args.family_json:
            report["per_byte"] = per_byte(results, json.loads(Path(args.family_json).read_text()),
                                          report["tokenization"]["legacy"], qdata.read_manifest(args.data))
            for name, v in report["per_byte"].items():
                print(f"  nats per byte, {name}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
