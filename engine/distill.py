"""`python -m engine distill DOC.txt --out FILE.safetensors`: a memory bank made from a document, no training.

    python -m engine distill data/facts/document.txt --out weights/facts.safetensors \\
        --arm "memory_bank:layers=8/14/20/26,chapters=4,top_k=2"
    python -m engine generate --prompt "..." --arm 'memory_bank:weights="weights/facts.safetensors"'

The document is read once by the frozen model (no chat template, stopping after the last host
layer). A bank's slots are the normalised inputs `x̂` of its host layer's self-attention at the
document's tokens (the default here is a bank per layer; a bank shared by several layers takes its first layer's), so that reading the
bank through the layer's own W_q, W_k, W_v, W_o is attention to the document's keys and values
without positions. Methods (`--method`):

- `tokens` (default): one slot per document token; the document is cut into C contiguous chapters
  of ceil(T/C) tokens (the last one padded with masked slots); `slots` becomes C·ceil(T/C).
- `chunks`: `slots` per bank; chapter c holds N/C slots, each the mean of a contiguous run of the
  chapter's tokens.
- `kmeans`: chapter c holds the N/C k-means centroids (scikit-learn) of its tokens.

The factorized variant stores the rank-r truncated SVD of the slot matrix (M ≈ A·Bᵀ); the reduced
variant's score projection P is, per KV head, the top-r right singular vectors of the slots' keys.
With chapters, the router's row for chapter c is the direction from the document's mean `x̂` to
the chapter's mean, scaled so that its logits over the document have unit standard deviation
(bias: minus their mean), so a token that resembles a chapter's part of the document picks it.
Slots are labelled by the document text they came from (traces show `chapter c / 'token' @i`).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import torch

DEFAULT_ARM = "memory_bank:sharing=per_layer"
METHODS = ("tokens", "chunks", "kmeans")


class DistillError(ValueError):
    """A distillation request that cannot be done; the message says why."""


def capture_x_hat(model, token_ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """x̂ [T, d] (fp32) at each layer's self-attention input; the forward stops after the last layer."""
    from .hooks import layer_inputs

    return {l: x.float() for l, x in layer_inputs(model, torch.tensor([token_ids]), layers).items()}


def _chapter_bounds(T: int, C: int) -> list[tuple[int, int]]:
    edges = [round(i * T / C) for i in range(C + 1)]
    return [(edges[i], edges[i + 1]) for i in range(C)]


def _label(tokenizer, ids: list[int], start: int, end: int) -> str:
    text = tokenizer.decode(ids[start:end]).strip().replace("\n", " ")
    if len(text) > 24:
        text = text[:23] + "…"
    return f"'{text}' @{start}" if end - start == 1 else f"'{text}' @{start}-{end - 1}"


def bank_slots(x: torch.Tensor, ids: list[int], tokenizer, method: str, slots: int, chapters: int):
    """(M [N, d], mask [N] bool, labels [N]) for one bank from the document's x̂ [T, d]."""
    T = x.shape[0]
    if method == "tokens":
        per = math.ceil(T / chapters)
        d = x.shape[1]
        M = torch.zeros(chapters * per, d)
        mask = torch.zeros(chapters * per, dtype=torch.bool)
        labels = ["(padding)"] * (chapters * per)
        for c in range(chapters):
            lo, hi = c * per, min(T, (c + 1) * per)
            n = max(0, hi - lo)
            M[c * per : c * per + n] = x[lo:hi]
            mask[c * per : c * per + n] = True
            for j in range(n):
                labels[c * per + j] = _label(tokenizer, ids, lo + j, lo + j + 1)
        return M, mask, labels
    n_c = slots // chapters
    bounds = _chapter_bounds(T, chapters)
    if any(hi - lo < n_c for lo, hi in bounds):
        raise DistillError(
            f"the document has {T} tokens: too few for {slots} slots in {chapters} chapters "
            f"(each chapter needs at least {n_c} tokens); use --method tokens or fewer slots"
        )
    rows, labels = [], []
    for lo, hi in bounds:
        xc = x[lo:hi]
        if method == "chunks":
            for lo2, hi2 in _chapter_bounds(hi - lo, n_c):
                rows.append(xc[lo2:hi2].mean(0))
                labels.append(_label(tokenizer, ids, lo + lo2, lo + hi2))
        else:
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=n_c, n_init=1, random_state=0).fit(xc.numpy())
            cent = torch.from_numpy(km.cluster_centers_).float()
            rows.append(cent)
            nearest = torch.cdist(cent, xc).argmin(1).tolist()
            labels += [_label(tokenizer, ids, lo + j, lo + j + 1) for j in nearest]
    M = torch.cat([r.reshape(-1, x.shape[1]) for r in rows])
    return M, torch.ones(M.shape[0], dtype=torch.bool), labels


def _bank_settings(arm: str, method: str):
    """The memory_bank settings `arm` asks for, as distill uses them (per-layer sharing unless told,
    slots set by the document later); DistillError / SpecError with one line otherwise."""
    from .spec import SpecError, parse_arm

    if method not in METHODS:
        raise DistillError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    import re

    chapters = re.search(r"\bchapters=(\d+)", arm)
    if method == "tokens" and chapters and not re.search(r"\bslots=", arm):
        arm += f",slots={chapters.group(1)}"  # placeholder that fits the chapters: the document sets slots
    spec = parse_arm(arm)
    if spec.mechanism != "memory_bank":
        raise DistillError(f"distill makes memory_bank weights; the arm is '{spec.mechanism or 'observer'}'")
    s = spec.settings
    if "sharing" not in s.model_fields_set:  # each layer reads its own layer's x̂ unless told otherwise
        s = s.model_copy(update={"sharing": "per_layer"})
    if s.weights:
        raise SpecError("distill writes a new weights file: leave weights out of --arm")
    return s


def _document_ids(lm, text: str, chapters: int) -> list[int]:
    """The document's token ids, refused (one line) when empty, shorter than the chapters, or
    longer than the model reads at once."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DistillError("the document is empty")
    if len(ids) < chapters:
        raise DistillError(f"the document has {len(ids)} tokens, fewer than the {chapters} chapters")
    limit = getattr(lm.model.config, "max_position_embeddings", 4096)
    if len(ids) > limit:
        raise DistillError(f"the document is {len(ids)} tokens; this model reads at most {limit} at once")
    return ids


def _fill_slots(weights, b, M, mask, s, n_slots: int) -> None:
    """Bank b's slots: M itself, or for the factorized variant its rank-r SVD factors."""
    if s.variant == "factorized":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = min(s.rank, S.shape[0])
        A = torch.zeros(n_slots, s.rank)
        B = torch.zeros(M.shape[1], s.rank)
        A[:, :r], B[:, :r] = U[:, :r] * S[:r], Vh[:r].T
        weights.p(b, "a").copy_(A)
        weights.p(b, "b").copy_(B)
    else:
        weights.p(b, "slots").copy_(M)


def _fill_projection(weights, b, M, mask, s, model, layer: int) -> None:
    """The reduced variant's per-head projection: the top-r right singular vectors of the slots' keys."""
    from .mechanisms.projections import LayerProjections

    proj = LayerProjections(model.model.layers[layer].self_attn, model.config, torch.float32)
    keys = proj.keys(M[mask].to(next(model.parameters()).device)).float().cpu()  # [n_kv, N, d_h]
    for h in range(keys.shape[0]):
        _, _, vh = torch.linalg.svd(keys[h], full_matrices=False)
        r = min(s.rank, vh.shape[0])
        P = torch.zeros(keys.shape[2], s.rank)
        P[:, :r] = vh[:r].T
        weights.p(b, "proj")[h].copy_(P)


def _fill_router(weights, b, X, M, mask, s, n_c: int) -> None:
    """A routed bank's router: each routed chapter's direction from the document mean, scaled so the
    document's own tokens score with unit spread and zero mean."""
    mu = X.mean(0)
    ch = torch.stack(
        [
            M[c * n_c : (c + 1) * n_c][mask[c * n_c : (c + 1) * n_c]].mean(0)
            for c in range(s.shared_chapters, s.chapters)
        ]
    )
    W = ch - mu
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-6)
    logits = X @ W.T
    W = W / logits.std(0).clamp_min(1e-6)[:, None]
    weights.p(b, "router_weight").copy_(W)
    weights.p(b, "router_bias").copy_(-(X @ W.T).mean(0))


def distill(
    lm,
    text: str,
    arm: str = DEFAULT_ARM,
    method: str = "tokens",
    out: str | Path | None = None,
    source_name: str = "document",
) -> dict:
    """Make a bank from `text`; write it to `out` if given. Returns timings and the settings used.

    One pipeline: validate, tokenise, run the layers, fill each bank's slots (and its projection
    or router), save."""
    from .mechanisms import MemoryBank
    from .weights import save_weights

    t0 = time.perf_counter()
    s = _bank_settings(arm, method)
    model, tok = lm.model, lm.tokenizer
    layers = s.resolved_layers(model.config.num_hidden_layers)
    groups = s.bank_of(layers)
    first_layer: dict = {}
    for layer in layers:
        first_layer.setdefault(groups[layer], layer)
    ids = _document_ids(lm, text, s.chapters)
    t_read = time.perf_counter()
    xs = capture_x_hat(model, ids, sorted(set(first_layer.values())))
    read_s = time.perf_counter() - t_read

    banks = {b: bank_slots(xs[layer].cpu(), ids, tok, method, s.slots, s.chapters) for b, layer in first_layer.items()}
    n_slots = next(iter(banks.values()))[0].shape[0]
    s = s.model_copy(update={"slots": n_slots, "gate_init": 1.0, "linkage": 1.0})
    weights = MemoryBank.build_weights(s, model, None).float().cpu()
    with torch.no_grad():
        for b, (M, mask, labels) in banks.items():
            weights.labels[b] = labels
            weights.p(b, "mask").copy_(mask)
            weights.p(b, "gate").fill_(1.0)
            _fill_slots(weights, b, M, mask, s, n_slots)
            if s.variant == "reduced":
                _fill_projection(weights, b, M, mask, s, model, first_layer[b])
            if s.routed:
                _fill_router(weights, b, xs[first_layer[b]].cpu(), M, mask, s, n_slots // s.chapters)
    distill_s = time.perf_counter() - t0
    result = {
        "tokens": len(ids),
        "slots": n_slots,
        "banks": len(banks),
        "layers": layers,
        "method": method,
        "read_s": round(read_s, 3),
        "distill_s": round(distill_s, 3),
        "settings": s.model_dump(exclude={"weights", "linkage"}),
    }
    if out is not None:
        result["sha256"] = save_weights(
            out,
            weights.to_tensors(),
            mechanism="memory_bank",
            settings=result["settings"],
            model=model,
            identity=lm.identity,
            extra={
                "distilled": {
                    "source": source_name,
                    "document_sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "tokens": len(ids),
                    "method": method,
                }
            },
        )
        result["out"] = str(out)
    return result


def main(args) -> int:
    from .model import ModelLoadError, load_model
    from .spec import SpecError

    try:
        path = Path(args.document)
        if not path.is_file():
            raise DistillError(f"document {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DistillError(f"document {path} is not UTF-8 text") from None
        lm = load_model(args.model, verbose=False)
        r = distill(lm, text, args.arm or DEFAULT_ARM, args.method, args.out, source_name=path.name)
    except (DistillError, SpecError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{r['out']}: {r['slots']} slots x {r['banks']} bank(s) on layers {r['layers']} from {r['tokens']} tokens "
        f"({r['method']}) in {r['distill_s']:.2f} s"
    )
    return 0
