"""What `train`, `eval` and `inspect` read and write: text files, token windows, a checkpoint with its tokenizer,
JSON results.

Text becomes tokens one way everywhere: each text is tokenized without special tokens and the texts are
joined into one stream with the tokenizer's end-of-text token between them; the stream is cut into
non-overlapping windows of `seq_len` tokens.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from symphony.errors import SymphonyError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def read_texts(paths) -> list[str]:
    """The contents of text files (UTF-8), one string per file; a missing, unreadable or empty file is an error."""
    texts = []
    for path in map(Path, paths):
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
    return list(full.split(batch_size)) + ([] if rest is None else [rest[None]])


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


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    model_dir = check_model_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        raise SymphonyError(f"cannot load the tokenizer in {model_dir}: {e}") from e


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


def check_output_file(path) -> Path:
    """Fail early (before any heavy work) when `path` cannot be written because its folder is missing."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SymphonyError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def write_json(path, obj):
    """Write `obj` as JSON to `path` atomically (a temporary file in the same folder, then a rename)."""
    path = check_output_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
