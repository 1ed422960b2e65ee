"""Reading a layer's own attention projections, whatever the model or its quantisation.

Mechanisms reuse the host layer's W_q, W_k, W_v, W_o. Plain linear layers are used in place; a
bitsandbytes 4-bit layer is dequantised once and the dense copy kept (per layer, not per token).
GQA is handled by grouping query heads over their key/value head, never by copying an expanded
matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DENSE: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}


def dense(linear: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a linear layer as dense tensors of `dtype`."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        key = id(linear)
        if key not in _DENSE:
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
            b = None if linear.bias is None else linear.bias.detach().to(dtype)
            _DENSE[key] = (w, b)
        return _DENSE[key]
    if weight.dtype != dtype:
        return weight.to(dtype), None if linear.bias is None else linear.bias.to(dtype)
    return weight, linear.bias


class LayerProjections:
    """The attention geometry and projections of one decoder layer's self-attention."""

    def __init__(self, attn: torch.nn.Module, config, dtype: torch.dtype):
        self.attn = attn
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.dtype = dtype
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3 / Gemma-style per-head norms
        self.k_norm = getattr(attn, "k_norm", None)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = dense(getattr(self.attn, name), self.dtype)
        return F.linear(x.to(self.dtype), w, b)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> q [n_kv, group, T, head_dim]."""
        q = self._proj("q_proj", x).view(x.shape[0], self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q.transpose(0, 1).reshape(self.n_kv, self.group, x.shape[0], self.head_dim)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> k [n_kv, T, head_dim]."""
        k = self._proj("k_proj", x).view(x.shape[0], self.n_kv, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k.transpose(0, 1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._proj("v_proj", x).view(x.shape[0], self.n_kv, self.head_dim).transpose(0, 1)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """heads [n_kv, group, T, head_dim] -> W_o · concat_h (no o_proj bias: delta is a direction)."""
        T = heads.shape[2]
        flat = heads.reshape(self.n_heads, T, self.head_dim).transpose(0, 1).reshape(T, -1)
        w, _ = dense(self.attn.o_proj, self.dtype)
        return F.linear(flat, w)


def clone_linear(linear: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    """A trainable dense copy of a (possibly 4-bit) linear layer: a trained mechanism starts exactly
    where the host's projection is."""
    w, b = dense(linear, dtype)
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=dtype, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE as transformers' Llama does: x*cos + rotate_half(x)*sin. cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
