"""Mechanism weights files: safetensors with the mechanism, its settings and the base model embedded.

A weights file is what `python -m engine train` / `distill` write and what an arm names with
`weights="path/to/file.safetensors"` (or `weights=@name`, a file `name.safetensors` in
`$LAB_WEIGHTS_DIR`, default `./weights`). Its metadata says which mechanism and settings it was made
with and for which base model (name, weights hash, hidden size, layer count), so a file made for
another model is refused before anything is built, with one line that says why.

Loaded parameters are cached per process by (mechanism, file content hash, model): every arm and
dialogue that names the same file shares one read-only module.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "memory-linkage-lab/weights-1"


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or made for another mechanism or model."""


@dataclass
class WeightsFile:
    path: Path
    sha256: str
    mechanism: str
    settings: dict
    model: dict  # name, weights_hash, hidden_size, num_hidden_layers, architecture
    extra: dict


def resolve_path(value: str) -> Path:
    """`@name` -> $LAB_WEIGHTS_DIR/name.safetensors; anything else is a path as written."""
    value = str(value).strip()
    if value.startswith("@"):
        folder = Path(os.environ.get("LAB_WEIGHTS_DIR", "weights"))
        name = value[1:]
        return folder / (name if name.endswith(".safetensors") else f"{name}.safetensors")
    return Path(value).expanduser()


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, memoised by (path, size, mtime)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise WeightsError(f"weights file {p} does not exist") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def model_fingerprint(model: torch.nn.Module, identity=None) -> dict:
    """What a weights file records about the base model it was made for."""
    cfg = model.config
    ident = identity.to_dict() if hasattr(identity, "to_dict") else (identity or {})
    return {
        "name": ident.get("name"),
        "weights_hash": ident.get("weights_hash"),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "architecture": ident.get("architecture") or type(model).__name__,
    }


def save_weights(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    mechanism: str,
    settings: dict,
    model: torch.nn.Module,
    identity=None,
    extra: dict | None = None,
) -> str:
    """Write a weights file (atomically: a temporary file renamed into place); return its sha256."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "mechanism": mechanism,
        "settings": json.dumps(settings, sort_keys=True),
        "model": json.dumps(model_fingerprint(model, identity), sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return file_sha256(p)


def read_header(path: str | Path) -> WeightsFile:
    """Read and check a weights file's metadata (not its tensors)."""
    from safetensors import safe_open

    p = resolve_path(str(path)) if isinstance(path, str) else Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist")
    sha = file_sha256(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            for name in names:  # touch every tensor's extent: a truncated file fails here
                f.get_slice(name).get_shape()
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise WeightsError(
            f"weights file {p} is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'corrupt'})"
        ) from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"weights file {p} was not written by this lab (no '{FORMAT}' metadata)")
    try:
        return WeightsFile(
            p,
            sha,
            meta["mechanism"],
            json.loads(meta["settings"]),
            json.loads(meta["model"]),
            json.loads(meta.get("extra", "{}")),
        )
    except (KeyError, json.JSONDecodeError) as e:
        raise WeightsError(f"weights file {p} has damaged metadata ({e})") from None


def load_tensors(wf: WeightsFile) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(wf.path))
    except Exception as e:
        raise WeightsError(f"weights file {wf.path} cannot be read ({type(e).__name__}: {e})") from None


def check_fits(wf: WeightsFile, mechanism: str, model: torch.nn.Module, identity=None) -> None:
    """Refuse a file made for another mechanism or another base model, naming the difference."""
    if wf.mechanism != mechanism:
        raise WeightsError(f"weights file {wf.path} is for mechanism '{wf.mechanism}', not '{mechanism}'")
    here = model_fingerprint(model, identity)
    for key, what in (("hidden_size", "hidden size"), ("num_hidden_layers", "layer count")):
        if wf.model.get(key) != here[key]:
            raise WeightsError(
                f"weights file {wf.path} was made for another model: {what} {wf.model.get(key)} "
                f"(model '{wf.model.get('name')}'), this model has {here[key]}"
            )
    theirs, ours = wf.model.get("weights_hash"), here.get("weights_hash")
    if theirs and ours and theirs != ours:
        raise WeightsError(
            f"weights file {wf.path} was made for model '{wf.model.get('name')}' (weights "
            f"{theirs[:12]}…), not for the loaded '{here.get('name')}' ({ours[:12]}…)"
        )


_SHARED: dict[tuple, torch.nn.Module | None] = {}
_LOCK = threading.Lock()


def shared_weights(cls, settings, model: torch.nn.Module, identity=None) -> tuple[torch.nn.Module | None, str | None]:
    """The mechanism's parameter module for these settings, built once per process and shared.

    With a `weights` file: checked against the model, keyed by the file's content hash. Without:
    `cls.build_weights(settings, model, None)` (fresh parameters), keyed by the settings.
    Returns (module or None, sha256 of the file or None).
    """
    path = getattr(settings, "weights", None)
    with _LOCK:
        if path:
            wf = read_header(path)
            check_fits(wf, cls.name, model, identity)
            key = (
                cls.name,
                wf.sha256,
                id(model),
                json.dumps(settings.model_dump(exclude={"linkage", "gain"}), sort_keys=True, default=str),
            )
            if key not in _SHARED:
                try:
                    module = cls.build_weights(settings, model, load_tensors(wf))
                except WeightsError:
                    raise
                except (ValueError, KeyError, RuntimeError) as e:
                    raise WeightsError(f"weights file {wf.path} does not fit these settings: {e}") from None
                _SHARED[key] = _freeze(module)
            return _SHARED[key], wf.sha256
        key = (
            cls.name,
            None,
            id(model),
            json.dumps(settings.model_dump(exclude={"linkage", "gain"}), sort_keys=True, default=str),
        )
        if key not in _SHARED:
            _SHARED[key] = _freeze(cls.build_weights(settings, model, None))
        return _SHARED[key], None


def _freeze(module):
    if module is not None:
        module.requires_grad_(False)
        module.eval()
    return module
