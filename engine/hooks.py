"""The mechanism host: one forward hook per decoder layer, dispatching to each arm's mechanism.

Mechanisms never touch the model. During a forward pass the caller (the dialogue loop, a capture,
a training step) tells the host which batch row belongs to which arm (`BatchContext`); the hook on
a layer's `self_attn` hands each active arm's real tokens to that arm's mechanism as a `LayerCall`
and adds `gain * linkage * delta` to the row (in place under inference; out of place when autograd
records, so training can backpropagate through it). Auxiliary losses a mechanism reports land in
`BatchContext.aux[row]`. Rows of inactive arms (observer, or linkage 0) are never read or written.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

from .mechanisms.base import LayerCall, Mechanism, StepRow


def decoder_layers(model: torch.nn.Module):
    """The list of decoder layers of a transformers causal LM (Llama, Qwen2, Mistral, Gemma, ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn"):
        raise TypeError(
            f"{type(model).__name__}: expected model.model.layers[i].self_attn; this architecture is not supported yet"
        )
    return layers


class _Enough(Exception):
    """Raised by `layer_inputs`' last hook: the layers above are not needed."""


def layer_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, layers, *, attention_mask=None, rope: bool = False
) -> dict[int, torch.Tensor | tuple[torch.Tensor, ...]]:
    """One plain base-model pass over `input_ids` [1, T]: each chosen layer's self-attention input x̂
    [T, hidden] (detached copies in the model's dtype), or with `rope=True` (x̂, cos, sin) with the
    rotary tables [T, head_dim] the layer received. No mechanism is dispatched and captures skip it
    (`base_pass`), so it is safe from inside another forward; the pass stops after the last chosen layer."""
    blocks = decoder_layers(model)
    last = max(layers)
    seen: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = {}

    def hook(layer: int):
        def pre(module, args, kwargs):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[0].detach().clone()
            if rope:
                cos, sin = kwargs["position_embeddings"]
                seen[layer] = (x, cos[0].detach().clone(), sin[0].detach().clone())
            else:
                seen[layer] = x
            if layer == last:
                raise _Enough

        return pre

    handles = [blocks[l].self_attn.register_forward_pre_hook(hook(l), with_kwargs=True) for l in set(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), MechanismHost.of(model).base_pass():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


@dataclass
class RowBinding:
    row: int
    mechanism: Mechanism
    valid: torch.Tensor  # [T] bool: which of this step's columns are real tokens for the row
    info: StepRow


@dataclass
class BatchContext:
    bindings: list[RowBinding]
    aux: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # row -> auxiliary losses

    def for_layer(self, layer: int) -> list[RowBinding]:
        return [b for b in self.bindings if b.mechanism.active and layer in b.mechanism.hook_layers]


class MechanismHost:
    """Attach once per model; hooks are added lazily for the layers some mechanism needs."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._local = threading.local()

    @classmethod
    def of(cls, model: torch.nn.Module) -> "MechanismHost":
        host = getattr(model, "_lab_host", None)
        if host is None:
            host = cls(model)
            model._lab_host = host
        return host

    @property
    def context(self) -> BatchContext | None:
        return getattr(self._local, "ctx", None)

    def ensure_hooks(self, layers) -> None:
        for layer in layers:
            if layer not in self._handles:
                attn = self.layers[layer].self_attn
                self._handles[layer] = attn.register_forward_hook(self._make_hook(layer), with_kwargs=True)

    def remove_hooks(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    @property
    def in_base_pass(self) -> bool:
        """True inside `base_pass()`: a forward that belongs to no batch (captures ignore it too)."""
        return getattr(self._local, "base_depth", 0) > 0

    @contextlib.contextmanager
    def base_pass(self):
        """Run the plain base model from inside a forward (e.g. a mechanism encoding a pinned text):
        no mechanism is dispatched, and observers of the outer forward (captures) skip it."""
        ctx = self.context
        self._local.ctx = None
        self._local.base_depth = getattr(self._local, "base_depth", 0) + 1
        try:
            yield
        finally:
            self._local.base_depth -= 1
            self._local.ctx = ctx

    @contextlib.contextmanager
    def use(self, ctx: BatchContext):
        self.ensure_hooks({l for b in ctx.bindings for l in b.mechanism.hook_layers})
        self._local.ctx = ctx
        try:
            yield
        finally:
            self._local.ctx = None

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            ctx = self.context
            if ctx is None:
                return None
            bindings = ctx.for_layer(layer)
            if not bindings:
                return None
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pos_emb = kwargs.get("position_embeddings")
            attn_out = output[0]
            if torch.is_grad_enabled():  # autograd records: never write into a tensor it may need
                attn_out = attn_out.clone()
            for b in bindings:
                idx = b.valid.nonzero().squeeze(-1)
                rope = None if pos_emb is None else (pos_emb[0][b.row, idx], pos_emb[1][b.row, idx])
                call = LayerCall(
                    layer, module, x[b.row, idx], rope, attn_out[b.row, idx], b.info, ctx.aux.setdefault(b.row, {})
                )
                delta = b.mechanism.forward(call)
                if delta is not None:
                    attn_out[b.row, idx] = attn_out[b.row, idx] + (b.mechanism.scale * delta).to(attn_out.dtype)
            return (attn_out, *output[1:]) if attn_out is not output[0] else output

        return hook
