"""What `train`, `eval` and `inspect` read and write: text files, token windows, a checkpoint with its tokenizer,
JSON results.

Text becomes tokens one way everywhere: each text is tokenized without special tokens and the texts are
joined into one stream with the tokenizer's end-of-text token between them; the stream is cut into
non-overlapping windows of `seq_len` tokens.
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import torch

from symphony.errors import SymphonyError
from symphony.outputs import check_output_file, write_text_atomic

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def read_texts(paths) -> list[str]:
    """The contents of text files (UTF-8), one string per file; a missing, unreadable or empty file is an error."""
    texts = []
    for path in map(Path, paths):
        if path.is_dir():
            raise SymphonyError(f"{path} is a folder, not a text file (give the text files in it)")
        if not path.is_file():
            raise SymphonyError(f"text file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SymphonyError(f"cannot read text file {path}: {e}") from e
        if not text.strip():
            raise SymphonyError(f"text file is empty: {path}")
        texts.append(text)
    return texts


def token_stream(tokenizer, texts) -> torch.Tensor:
    """All texts as one LongTensor of token ids, joined by the end-of-text token (when the tokenizer has one)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SymphonyError("no text: every text given is empty")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream = [tok for i, seq in enumerate(ids) for tok in (sep if i else []) + seq]
    if not stream:
        raise SymphonyError("the text has no tokens")
    return torch.tensor(stream, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a token stream into non-overlapping windows: ([n, seq_len] full windows, the shorter rest or None)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, not {seq_len}")
    n = stream.numel() // seq_len
    rest = stream[n * seq_len:]
    return stream[:n * seq_len].view(n, seq_len), (rest if rest.numel() else None)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Every token of the stream once: [b, seq_len] batches of full windows, then the rest as a [1, r] batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    full, rest = windows(stream, seq_len)
    return (list(full.split(batch_size)) if len(full) else []) + ([] if rest is None else [rest[None]])


def resolve_device(device="auto") -> torch.device:
    """A torch.device from "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or a torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SymphonyError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SymphonyError(f"device {device!r} asked for, but this torch has no usable CUDA device")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """A torch.dtype from a name in DTYPES, a torch.dtype, or "auto": bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SymphonyError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def experts_implementation(device: torch.device) -> str | None:
    """Symphony's kernels on CUDA when they are registered with transformers, transformers' eager path on CPU."""
    if device.type != "cuda":
        return "eager"
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    try:
        import symphony.nn.hf as hf

        if "symphony" not in ALL_EXPERTS_FUNCTIONS and hasattr(hf, "register"):
            hf.register()
    except ImportError:
        pass
    if "symphony" in ALL_EXPERTS_FUNCTIONS:
        return "symphony"
    warnings.warn("the 'symphony' experts implementation is not available; using transformers' default")
    return None


# torch.nn.init's warning for a zero-size weight (see quiet_zero_size_init).
ZERO_SIZE_INIT_WARNING = "Initializing zero-element tensors is a no-op"


@contextlib.contextmanager
def quiet_zero_size_init():
    """Inside the block, hide torch's UserWarning "Initializing zero-element tensors is a no-op", and only it.

    transformers initialises every weight of a model it builds or loads, and torch.nn.init warns for each
    zero-size one. A Symphony Qwen2-MoE whose shared expert is disabled has such weights on purpose (0
    neurons; symphony.build.targets), so wrap the code that builds or loads models in this. Every other warning
    goes through as before (the filter matches this exact message and category; the previous filters are
    restored on exit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(ZERO_SIZE_INIT_WARNING) + "$", category=UserWarning)
        yield


def check_model_dir(model_dir) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SymphonyError(f"model folder not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise SymphonyError(f"{model_dir} is not a transformers checkpoint (no config.json)")
    return model_dir


def load_config(model_dir):
    from transformers import AutoConfig

    model_dir = check_model_dir(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad checkpoint, said in one line
        raise SymphonyError(f"cannot read the config in {model_dir}: {e}") from e


# Files a tokenizer is made from (one of them must be there: without any, transformers quietly builds a
# tokenizer of one token that turns every text into nothing).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model")
# Files of a checkpoint folder that the commands read (what an output file must not replace).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "model.safetensors.index.json", "alignment_report.json",
                    "symphony_build.yaml") + TOKENIZER_FILES
_PROBE = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42"


def check_tokenizer(tokenizer, folder, what: str = ""):
    """Refuse a tokenizer that is not one: `folder` has no tokenizer files, or a probe text becomes no tokens
    (or only unknown tokens). `what` names the owner at the start of the message ("source 'code'")."""
    folder, what = Path(folder), f"{what}: " if what else ""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SymphonyError(f"{what}no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES[:4])}...); "
                            "copy the tokenizer files of the model there")
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise SymphonyError(f"{what}the tokenizer in {folder} turns text into no tokens ({len(tokenizer)} "
                            "tokens in its vocabulary); its files are incomplete")


def checkpoint_files(model_dir) -> list:
    """(label, path) of the files in `model_dir` that the commands read (for check_output_file's inputs)."""
    model_dir = Path(model_dir)
    return [(f"file {p.name} of the model", p) for p in model_dir.iterdir()
            if p.is_file() and (p.name in CHECKPOINT_FILES or p.name.endswith(".safetensors"))]


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    model_dir = check_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        raise SymphonyError(f"cannot load the tokenizer in {model_dir}: {e}") from e
    check_tokenizer(tokenizer, model_dir)
    return tokenizer


def check_seq_len(config, seq_len: int):
    """Refuse windows longer than the model's positions (its results there would be silently wrong)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise SymphonyError(f"--seq-len {seq_len} is longer than the {limit} positions of the model "
                            "(max_position_embeddings)")


def load_model(model_dir, *, device="auto", dtype="auto"):
    """The causal LM in `model_dir` on `device` in `dtype`, in eval mode (experts as experts_implementation says;
    torch's warning for the zero-size weights of a disabled shared expert hidden: quiet_zero_size_init)."""
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    impl = experts_implementation(dev)
    try:
        with quiet_zero_size_init():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, experts_implementation=impl)
    except Exception as e:  # noqa: BLE001
        raise SymphonyError(f"cannot load the model in {model_dir}: {e}") from e
    return model.to(dev).eval()


def write_json(path, obj):
    """Write `obj` as JSON to `path` atomically (symphony.outputs.write_text_atomic; checked first by
    check_output_file)."""
    write_text_atomic(check_output_file(path), json.dumps(obj, indent=2) + "\n")
