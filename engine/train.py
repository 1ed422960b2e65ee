"""`python -m engine train CONFIG.yaml`: train any mechanism's parameters on the frozen base model.

    python -m engine train configs/bank_tiny_cpu.yaml
    accelerate launch -m engine train configs/bank_gpu.yaml        # several GPUs: DDP via Accelerate
    python -m engine train CONFIG.yaml --resume runs/x/checkpoints/step-40   (or `resume: auto`)

The base model is frozen. What trains is the mechanism's parameter module (and, optionally, LoRA
adapters on the base model through `peft`), on a text JSONL (`{"text": ...}`) or chat JSONL
(`{"messages": [{"role", "content"}, ...]}`) file, with shifted next-token loss, separate learning
rates, gradient accumulation and clipping, held-out loss/perplexity every `eval_every` steps, early
stopping, the best weights kept, checkpoints (Accelerate state: parameters, optimizer, scheduler,
RNG, data position) to resume from, and a tqdm bar. The output is a lab weights file
(`engine.weights.save_weights`: settings + base-model identity embedded) that an arm loads with
`NAME:weights="FILE"`. LoRA adapters, when trained, are saved next to it as a peft adapter folder
(`<output>.lora/`): an arm cannot carry them (the lab's model is shared by every arm), so they are
for offline comparison. Adapters on a mechanism's own parameters (partial attention's `lora_rank`:
peft LoRA on its cloned projections) are part of its module and of the weights file an arm loads.

The config is YAML validated by pydantic (`TrainConfig`); every bad key or value is reported as
one line naming its key path, and the command exits with status 2.

Mechanism-side contract (what a mechanism provides to be trainable here):
- `Settings` with a `weights` key (`file_field`), and `build_weights(settings, model, tensors)`
  returning an `nn.Module` whose parameters with `requires_grad` are what trains (built fresh
  when `tensors` is None, or from `init_weights`' tensors); the trainer leaves the others frozen
  (e.g. partial attention's cloned projections under its own peft LoRA adapters).
- The module's `to_tensors()` -> dict[str, Tensor] (or, without it, its `state_dict()`) must be
  what `build_weights(..., tensors)` reads back: it is what the weights file holds.
- `cls(settings, model, weights=module)` makes one instance per sequence; `reset()` is called
  before each. Its `forward(call)` must be differentiable in the module's parameters (the host
  adds the residual out of place under grad) and may put auxiliary losses into `call.aux` under
  keys `"<loss name>.<anything>"`; the config's `train.aux_weights` weighs them by loss name
  (e.g. `router_balance: 0.01`), summing over layers and averaging over sequences.
- With `data.documents: true` each row carries a `document`: the trainer reads it with the frozen
  model (x̂ at the mechanism's layers, what `engine distill --method tokens` stores) and hands it
  to `mech.bind_document(...)` before the row; what trains is `cls.build_reader(...)`, a module
  that reads any such document (memory_bank's reader), saved with `extra.reader = true`.
- With `data.negatives: true` a chat row may carry a `wrong` reply (e.g. the other person's town of
  the same document): the row is also run with it in place of its last reply (the same document
  bound), and `train.margin_weight` * softplus(`train.margin` - (log p(right) - log p(wrong))), each
  summed over the reply's tokens, joins the loss; the held-out evaluation reports the mean margin,
  and the best weights are those of the lowest held-out answer loss + weighted margin term.
- `plan(row)` is applied to each training row as the dialogue applies it (`engine.dialogue.apply_plan`
  and `attention_mask_4d`: per-row position ids, extra allowed mask pairs), so a mechanism that edits
  the mask or the positions trains under the edits it will run with. A training row is one
  sequence at turn 0, right-padded.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .dialogue import apply_plan, attention_mask_4d
from .hooks import BatchContext, MechanismHost, RowBinding, layer_inputs
from .mechanisms import StepRow


class ConfigError(ValueError):
    """A training config is wrong; `lines` are one message per problem, each with its key path."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MechanismConfig(_Strict):
    name: str = Field(description="a registered mechanism (python -m engine mechanisms)")
    settings: dict[str, Any] = Field(default_factory=dict, description="its Settings keys (linkage is set to 1)")


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="module names to adapt"
    )


class DataConfig(_Strict):
    train: str = Field(description="JSONL: {'text': ...} or {'messages': [...]} per line")
    eval: str | None = Field(None, description="held-out JSONL; default: eval_fraction of train")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="split held out when eval is not given")
    eval_control: str | None = Field(
        None,
        description="held-out JSONL of control rows: the eval rows with what the mechanism should carry "
        "changed (e.g. another fact planted, the answer kept); evaluated beside eval, so the log's "
        "control_loss shows how much of a held-out gain depends on it and how much is a prior",
    )
    format: Literal["auto", "text", "chat"] = Field("auto", description="line format")
    max_length: int = Field(512, ge=8, le=131072, description="tokens per sequence (longer are cut)")
    loss_on: Literal["all", "assistant", "last", "tail"] = Field(
        "all",
        description="chat: train on every token, the replies, the last reply only (e.g. a recall answer), "
        "or the last `tail_tokens` reply tokens (e.g. a sign-off the system prompt asks for)",
    )
    tail_tokens: int = Field(16, ge=1, le=131072, description="loss_on=tail: how many of the last reply tokens")
    end_of_reply: bool = Field(
        False,
        description="chat: also train the chat template's end-of-turn token after each trained reply, so a "
        "mechanism that pushes an answer also learns where the answer stops (off: the reply's words only)",
    )
    documents: bool = Field(
        False,
        description="each row has a 'document': it is distilled into the memory bank "
        "before the row (as engine distill does), and a bank reader trains",
    )
    negatives: bool = Field(
        False,
        description="chat rows may carry a 'wrong' reply (a string; null or absent: none): it is scored in "
        "place of the row's last reply, and train.margin_weight weighs a margin term that pushes "
        "log p(right reply) above log p(wrong reply) by train.margin; the held-out evaluation reports "
        "the mean margin",
    )


class TrainSection(_Strict):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, le=4096, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate of the mechanism's parameters")
    lora_lr: float = Field(1e-4, gt=0, le=10, description="learning rate of LoRA adapters")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "cosine", "linear"] = Field("cosine", description="learning-rate schedule")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this norm (null: no clipping)")
    eval_every: int = Field(20, ge=1, description="evaluate every N optimizer steps")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N evals without improvement")
    min_delta: float = Field(0.0, ge=0, description="improvement that counts for early stopping")
    aux_weights: dict[str, float] = Field(
        default_factory=lambda: {"router_balance": 0.01, "router_aux": 0.0, "router_z": 0.001},
        description="weight per auxiliary loss name",
    )
    margin_weight: float = Field(
        1.0,
        ge=0.0,
        le=1000.0,
        description="data.negatives: weight of the margin term "
        "softplus(margin - (log p(right) - log p(wrong))), summed over the last reply's tokens, mean over pairs",
    )
    margin: float = Field(
        2.0, ge=0.0, le=1000.0, description="data.negatives: the margin in nats the term asks right to beat wrong by"
    )
    seed: int = Field(0, ge=0, description="seed for initialisation and data order")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Accelerate mixed precision")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU intra-op threads (torch.set_num_threads); on a busy machine 1 is fastest"
    )
    window: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="sliding attention window: each token sees the first `sink` tokens and the "
        "last N (as a dialogue's window=N), so only a memory carries what fell out",
    )
    sink: int = Field(4, ge=0, le=1024, description="attention-sink tokens kept visible under `window`")


class OutputConfig(_Strict):
    dir: str = Field(description="run folder: checkpoints/, log.jsonl")
    weights: str | None = Field(None, description="weights file to write; default <dir>/weights.safetensors")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps (always at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept")


class TrainConfig(_Strict):
    model: str = Field("embedded", description="'embedded', a local folder or a cached model id")
    dtype: str | None = Field(None, description="float32 / bfloat16 / float16 (default: the loader's)")
    mechanism: MechanismConfig
    init_weights: str | None = Field(None, description="start from this weights file (e.g. a distilled bank)")
    lora: LoraConfig | None = Field(None, description="also train LoRA adapters (peft)")
    data: DataConfig
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputConfig
    resume: str | None = Field(None, description="a checkpoint folder, or 'auto' for the latest in output.dir")

    @model_validator(mode="after")
    def _mechanism_settings(self):
        from .mechanisms import MECHANISMS

        if self.mechanism.name not in MECHANISMS:
            raise ValueError(
                f"mechanism.name: unknown mechanism '{self.mechanism.name}' (known: {', '.join(MECHANISMS)})"
            )
        cls = MECHANISMS[self.mechanism.name]
        if not hasattr(cls, "build_weights") or "weights" not in cls.Settings.model_fields:
            raise ValueError(f"mechanism.name: '{self.mechanism.name}' has no trainable weights")
        if self.data.negatives and self.data.format == "text":
            raise ValueError("data.negatives: a 'wrong' reply replaces a chat row's last reply; format text has none")
        return self

    def settings(self):
        from .mechanisms import MECHANISMS

        cls = MECHANISMS[self.mechanism.name]
        return cls.Settings(**{**self.mechanism.settings, "linkage": 1.0, "weights": None})

    @property
    def weights_path(self) -> Path:
        return Path(self.output.weights) if self.output.weights else Path(self.output.dir) / "weights.safetensors"


def _format_errors(e: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in e.errors():
        path = prefix + ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        elif err["type"] == "value_error" and not err["loc"]:
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"{path}: {msg[0].lower() + msg[1:]} (got {err.get('input')!r})")
    return lines


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config; raise ConfigError with one line per problem."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file {p} does not exist"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            [f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or str(e).splitlines()[0]})"]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config file {p} is not UTF-8 text"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: expected a mapping of keys at the top level"])
    try:
        cfg = TrainConfig(**raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    try:
        cfg.settings()
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "mechanism.settings.")) from None
    for key in ("train", "eval", "eval_control"):
        f = getattr(cfg.data, key)
        if f is not None and not Path(f).is_file():
            raise ConfigError([f"data.{key}: file {f} does not exist"])
    if cfg.init_weights and not Path(cfg.init_weights).is_file():
        raise ConfigError([f"init_weights: file {cfg.init_weights} does not exist"])
    return cfg


# ============================================================================ data


def read_jsonl(path: str | Path, fmt: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError([f"{path} line {n}: not JSON ({e.msg})"]) from None
            kind = "chat" if isinstance(row, dict) and "messages" in row else "text"
            if (
                not isinstance(row, dict)
                or (kind == "text" and not isinstance(row.get("text"), str))
                or (fmt != "auto" and kind != fmt)
            ):
                raise ConfigError(
                    [
                        f"{path} line {n}: expected an object with "
                        f"{'a messages list' if fmt == 'chat' else 'a text string' if fmt == 'text' else 'text or messages'}"
                    ]
                )
            rows.append(row)
    if not rows:
        raise ConfigError([f"{path}: no examples"])
    return rows


def _chat_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and role codes of chat messages through the chat template."""
    from .chat import _tokenize_with_roles
    from .mechanisms.base import ROLE_CODE

    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        i = text.find(m["content"], cursor) if m.get("content") else -1
        if i >= 0:
            spans.append((i, i + len(m["content"]), m["role"] if m["role"] in ROLE_CODE else "user"))
            cursor = i + len(m["content"])
    piece = _tokenize_with_roles(tokenizer, text, spans)
    return piece.token_ids, piece.roles


def _last_reply(ids: list[int], roles: list[int]) -> list[int]:
    """Labels of the last run of reply tokens only (-100 elsewhere)."""
    from .mechanisms.base import ROLE_CODE

    A = ROLE_CODE["assistant"]
    end = max((i for i, r in enumerate(roles) if r == A), default=-1) + 1
    start = end
    while start > 0 and roles[start - 1] == A:
        start -= 1
    return [t if start <= i < end else -100 for i, t in enumerate(ids)]


def _with_reply_ends(tokenizer, ids: list[int], roles: list[int], labels: list[int]) -> list[int]:
    """`labels` with the special token that closes each trained reply labelled too (SmolLM2's
    <|im_end|>): the template token right after a reply's last token, when that reply token is trained."""
    from .mechanisms.base import ROLE_CODE

    A, special = ROLE_CODE["assistant"], set(tokenizer.all_special_ids)
    out = list(labels)
    for i in range(len(ids) - 1):
        if roles[i] == A and roles[i + 1] != A and labels[i] != -100 and ids[i + 1] in special:
            out[i + 1] = ids[i + 1]
    return out


def _negative(tokenizer, row: dict, max_length: int) -> dict | None:
    """The row with its 'wrong' reply in place of its last reply: ids, roles, and that reply's labels
    (None when the row has no wrong reply)."""
    wrong = row.get("wrong")
    if wrong is None:
        return None
    messages = row.get("messages")
    if not isinstance(wrong, str) or not wrong.strip():
        raise ConfigError([f"data.negatives: a row's 'wrong' must be a non-empty string or null (got {wrong!r})"])
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(["data.negatives: a row with a 'wrong' reply needs messages ending in an assistant reply"])
    ids, roles = _chat_ids(tokenizer, [*messages[:-1], {**messages[-1], "content": wrong}])
    ids, roles = ids[:max_length], roles[:max_length]
    return {"ids": ids, "roles": roles, "reply": _last_reply(ids, roles)}


def encode(
    tokenizer,
    row: dict,
    max_length: int,
    loss_on: str,
    documents: bool = False,
    tail_tokens: int = 16,
    negatives: bool = False,
    end_of_reply: bool = False,
) -> dict:
    """token ids, role codes and labels (-100 = no loss) of one example (and its document's ids;
    with `negatives`, the labels of its last reply and the row with its 'wrong' reply, if any)."""
    from .mechanisms.base import ROLE_CODE

    if "messages" in row:
        ids, roles = _chat_ids(tokenizer, row["messages"])
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        roles = [ROLE_CODE["assistant"]] * len(ids)
    ids, roles = ids[:max_length], roles[:max_length]
    labels = [t if (loss_on == "all" or r == ROLE_CODE["assistant"]) else -100 for t, r in zip(ids, roles)]
    if loss_on == "last":  # the last run of reply tokens only
        labels = _last_reply(ids, roles)
    if loss_on == "tail":  # the last `tail_tokens` reply tokens: a reply's end, where a constraint shows
        counted = set([i for i, label in enumerate(labels) if label != -100][-tail_tokens:])
        labels = [t if i in counted else -100 for i, t in enumerate(ids)]
    if end_of_reply and "messages" in row:
        labels = _with_reply_ends(tokenizer, ids, roles, labels)
    out: dict[str, Any] = {"ids": ids, "roles": roles, "labels": labels}
    if negatives:
        neg = _negative(tokenizer, row, max_length)
        if neg is not None:
            out |= {"reply": _last_reply(ids, roles), "neg": neg}
    if documents:
        if not isinstance(row.get("document"), str) or not row["document"].strip():
            raise ConfigError(["data.documents: every row needs a non-empty 'document' string"])
        out["doc"] = tokenizer(row["document"], add_special_tokens=False)["input_ids"]
    return out


def window_mask(valid, window: int, sink: int = 4):
    """[B, 1, T, T] bool for right-padded rows: causal, each token sees the first `sink` tokens and
    the last `window` before it (and itself), as a dialogue's attention window; padding sees itself."""
    import torch

    B, T = valid.shape
    i = torch.arange(T, device=valid.device)[:, None]
    j = torch.arange(T, device=valid.device)[None, :]
    allowed = (j <= i) & ((j < sink) | (j >= i - window))
    m = allowed[None] & valid[:, None, :] & valid[:, :, None]
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return (m | (eye & ~valid[:, :, None]))[:, None]


def collate(batch: list[dict], pad_id: int):
    """Right-padded tensors of a batch. Rows with a negative (encode's `neg`) add their wrong-reply
    row after the batch's rows (no NLL labels), `reply` [rows, T] labels each row's last reply and
    `pair` [negatives] names each negative's row; documents stay one per row of the batch."""
    import torch

    negatives = [(i, b["neg"]) for i, b in enumerate(batch) if "neg" in b]
    rows = batch + [{**neg, "labels": [-100] * len(neg["ids"])} for _, neg in negatives]
    T = max(len(b["ids"]) for b in rows)
    out = {
        "ids": torch.full((len(rows), T), pad_id),
        "roles": torch.zeros(len(rows), T, dtype=torch.long),
        "labels": torch.full((len(rows), T), -100),
        "valid": torch.zeros(len(rows), T, dtype=torch.bool),
    }
    for i, b in enumerate(rows):
        n = len(b["ids"])
        out["ids"][i, :n] = torch.tensor(b["ids"])
        out["roles"][i, :n] = torch.tensor(b["roles"])
        out["labels"][i, :n] = torch.tensor(b["labels"])
        out["valid"][i, :n] = True
    if negatives:
        out["reply"] = torch.full((len(rows), T), -100)
        for i, b in enumerate(rows):
            if "reply" in b:
                out["reply"][i, : len(b["reply"])] = torch.tensor(b["reply"])
        out["pair"] = torch.tensor([i for i, _ in negatives])
    if "doc" in batch[0]:  # documents, right-padded: a causal pass reads each one's tokens unchanged
        D = max(len(b["doc"]) for b in batch)
        out["doc_ids"] = torch.full((len(batch), D), pad_id)
        out["doc_len"] = torch.tensor([len(b["doc"]) for b in batch])
        for i, b in enumerate(batch):
            out["doc_ids"][i, : len(b["doc"])] = torch.tensor(b["doc"])
    return out


# ============================================================================ the model under training


class MechanismTrainer(torch.nn.Module):
    """An nn.Module whose forward is one batch's loss: the frozen base with the mechanism bound by
    row, each row's plan applied as the dialogue applies it (so training sees what running sees).
    With negatives in the batch (`pair`, `reply`: see `collate`) a margin term joins the auxiliary
    loss, and `last_margins` holds each pair's log p(right) - log p(wrong) of the last forward."""

    def __init__(
        self,
        base,
        cls,
        settings,
        weights,
        aux_weights: dict[str, float],
        window: int | None = None,
        sink: int = 4,
        *,
        margin_weight: float = 1.0,
        margin: float = 2.0,
    ):
        super().__init__()
        self.base = base
        self.weights = weights
        self.host = MechanismHost.of(base)
        self.mechanisms: list = []
        self.cls, self.settings, self.aux_weights = cls, settings, aux_weights
        self.window, self.sink = window, sink
        self.margin_weight, self.margin = margin_weight, margin
        self.last_margins: torch.Tensor | None = None

    def state_dict(self, *args, **kwargs):
        """Only what trains (the frozen base is not checkpointed)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad} | {
            f"weights.{n}": b for n, b in self.weights.named_buffers()
        }

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        own = dict(self.named_parameters()) | {f"weights.{n}": b for n, b in self.weights.named_buffers()}
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, v in state.items():
                if n in own:
                    own[n].copy_(v)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _mechanism(self, i: int):
        """Row i's mechanism instance, reset: one per row, kept across batches (built once)."""
        while len(self.mechanisms) <= i:
            self.mechanisms.append(self.cls(self.settings, self.base, weights=self.weights))
        m = self.mechanisms[i]
        m.reset()
        return m

    def documents(self, doc_ids, doc_len) -> list[dict]:
        """Per row: layer -> the document's x̂ [n, d] at the bank's layers (what distill stores)."""
        layers = self._mechanism(0).layers
        return [
            {l: x[: int(n)] for l, x in layer_inputs(self.base, doc_ids[r : r + 1, : int(n)], layers).items()}
            for r, n in enumerate(doc_len)
        ]

    def _bind_rows(self, ids, roles, valid, docs, positions) -> tuple[list, dict]:
        """Each row's binding (its mechanism, reset, bound to its document) and the extra mask pairs
        its plan allows; `positions` [B, T] is edited in place by the plans."""
        bindings, allow = [], {}
        for r in range(ids.shape[0]):
            n = int(valid[r].sum())
            info = StepRow(
                positions=torch.arange(n, device=ids.device),
                roles=roles[r, :n],
                token_ids=ids[r, :n],
                turn=0,
                record=False,
            )
            mech = self._mechanism(r)
            if docs is not None:
                mech.bind_document(docs[r])
            plan = mech.plan(info) if mech.active else None
            if plan is not None:
                apply_plan(r, plan, valid[r], positions, allow)
            bindings.append(RowBinding(r, mech, valid[r], info))
        return bindings, allow

    def _mask(self, valid, allow: dict, T: int):
        """The batch's attention mask: padding only, the training window, or the plans' extra pairs."""
        mask = valid.long()
        if self.window is not None:
            if allow:
                raise ValueError(
                    "train.window: this mechanism edits the attention mask, which a window cannot be combined with yet"
                )
            return window_mask(valid, self.window, self.sink)
        if allow:
            return attention_mask_4d(mask.cpu(), T, allow, self.base.config._attn_implementation, self.base.dtype).to(
                valid.device
            )
        return mask

    def logits(self, ids, roles, valid, doc_ids=None, doc_len=None, pair=None):
        """The batch's logits [B, T, V] and the mechanisms' auxiliary losses: rows right-padded, each
        row's plan (positions, extra mask pairs) applied as the dialogue applies it. The last
        len(pair) rows are negatives: each reads the document of its row `pair[k]`."""
        B, T = ids.shape
        docs = self.documents(doc_ids, doc_len) if doc_ids is not None else None
        if docs is not None and pair is not None:
            docs = docs + [docs[int(p)] for p in pair]
        positions = torch.arange(T, device=ids.device).repeat(B, 1)
        bindings, allow = self._bind_rows(ids, roles, valid, docs, positions)
        mask = self._mask(valid, allow, T)
        ctx = BatchContext(bindings)
        with self.host.use(ctx):
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.logits, ctx.aux

    def forward(self, ids, roles, labels, valid, doc_ids=None, doc_len=None, reply=None, pair=None):
        """(summed next-token NLL, tokens counted, weighted auxiliary loss averaged over rows, plus
        the weighted margin term over the batch's negatives when it has some)."""
        all_logits, aux_losses = self.logits(ids, roles, valid, doc_ids, doc_len, pair)
        logits = all_logits[:, :-1].float()
        target = labels[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        n_tokens = (target != -100).sum()
        aux = torch.zeros((), device=logits.device)
        for row_losses in aux_losses.values():
            for key, value in row_losses.items():
                aux = aux + self.aux_weights.get(key.split(".")[0], 0.0) * value
        aux = aux / max(1, len(aux_losses))
        self.last_margins = None
        if pair is not None and len(pair):
            margins = self.margins(logits, reply[:, 1:], pair)
            aux = aux + self.margin_weight * F.softplus(self.margin - margins).mean()
            self.last_margins = margins.detach()
        return nll, n_tokens, aux

    @staticmethod
    def margins(logits, reply, pair):
        """Per pair, log p(right reply) - log p(wrong reply), each summed over its labelled tokens:
        the rows' shifted logits [R, T-1, V], reply labels [R, T-1], and the negatives' rows
        (the last len(pair) rows, the k-th the negative of row pair[k])."""
        R, T1, V = logits.shape
        lp = -F.cross_entropy(logits.reshape(-1, V), reply.reshape(-1), ignore_index=-100, reduction="none")
        lp = lp.view(R, T1).sum(1)
        return lp[pair] - lp[R - len(pair) :]


# The module `train` optimises (its forward is one batch's loss), by its public name: studies train and
# score through the very same batched loss (studies/persistent_window.py).
trainer_module = MechanismTrainer


def _weights_tensors(module) -> dict:
    return module.to_tensors() if hasattr(module, "to_tensors") else dict(module.state_dict())


# ============================================================================ setting a run up


def _build_weights(cfg: TrainConfig, cls, settings, base, lm):
    """The mechanism's trainable module: its weights (or, with documents, its reader), from
    `init_weights` when given; ConfigError when nothing in it would train."""
    from .weights import check_fits, load_tensors, read_header

    tensors = None
    if cfg.init_weights:
        wf = read_header(cfg.init_weights)
        check_fits(wf, cls.name, base, lm.identity)
        tensors = load_tensors(wf)
    if cfg.data.documents:
        if not hasattr(cls, "build_reader"):
            raise ConfigError([f"data.documents: mechanism '{cls.name}' has no reader to train (memory_bank has)"])
        try:
            weights = cls.build_reader(settings, base, tensors)
        except ValueError as e:
            raise ConfigError([f"mechanism.settings: {e}"]) from None
    else:
        weights = cls.build_weights(settings, base, tensors)
    if weights is None or not any(p.requires_grad for p in weights.parameters()):
        raise ConfigError([f"mechanism.name: '{cls.name}' built no trainable parameters for these settings"])
    weights.train()  # what trains is what build_weights left requiring grad (e.g. LoRA adapters, not the clones)
    return weights


def _inject_lora(cfg: TrainConfig, base) -> list:
    """peft LoRA adapters on the base model when the config asks; their parameters (trainable)."""
    if cfg.lora is None:
        return []
    from peft import LoraConfig as PeftLora
    from peft import inject_adapter_in_model

    inject_adapter_in_model(
        PeftLora(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        ),
        base,
    )
    lora_params = [p for n, p in base.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    return lora_params


def _loaders(cfg: TrainConfig, tok):
    """(train loader, held-out loader, whether there is held-out data, control loader or None): the
    held-out rows are the eval file, or a seeded `eval_fraction` split of the training rows."""
    from torch.utils.data import DataLoader

    rows = read_jsonl(cfg.data.train, cfg.data.format)
    if cfg.data.eval:
        eval_rows = read_jsonl(cfg.data.eval, cfg.data.format)
    else:
        order = list(range(len(rows)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(round(len(rows) * cfg.data.eval_fraction))) if cfg.data.eval_fraction > 0 else 0
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in order[n_eval:]] or rows
    d = cfg.data

    def encoded(part: list[dict]) -> list[dict]:
        return [
            encode(tok, r, d.max_length, d.loss_on, d.documents, d.tail_tokens, d.negatives, d.end_of_reply)
            for r in part
        ]

    enc, enc_eval = encoded(rows), encoded(eval_rows)
    if d.negatives and not any("neg" in e for e in enc):
        raise ConfigError([f"data.negatives: no row of {d.train} has a 'wrong' reply"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    loader = DataLoader(
        enc,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=False,
        collate_fn=lambda b: collate(b, pad),
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )

    def in_order(enc_rows: list[dict]):
        return DataLoader(
            enc_rows, batch_size=cfg.train.batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad)
        )

    control = in_order(encoded(read_jsonl(d.eval_control, d.format))) if d.eval_control else None
    return loader, in_order(enc_eval), bool(enc_eval), control


def lr_factor(step: int, schedule: str, warm: int, total: int) -> float:
    """The learning rate's multiplier at `step`: linear warm-up, then constant, linear or cosine decay."""
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    frac = (step - warm) / max(1, total - warm)
    return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _optimizer(cfg: TrainConfig, weights, lora_params: list):
    """AdamW (the mechanism's parameters at `lr`, LoRA's at `lora_lr`) and its schedule."""
    groups = [{"params": [p for p in weights.parameters() if p.requires_grad], "lr": cfg.train.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": cfg.train.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    t = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.schedule, t.warmup_steps, t.max_steps)
    )
    return optimizer, scheduler


def _resume_point(cfg: TrainConfig, resume: str | None, ckpt_root: Path) -> str | None:
    """The checkpoint folder to resume from ('auto': the newest under checkpoints/), or None."""
    resume = resume or cfg.resume
    if resume == "auto":
        found = sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if ckpt_root.is_dir() else []
        resume = str(found[-1]) if found else None
    if resume and not (Path(resume) / "trainer_state.json").is_file():
        raise ConfigError([f"resume: {resume} is not a checkpoint of this trainer (no trainer_state.json)"])
    return resume


# ============================================================================ the loop


@dataclass
class _Run:
    """One training run once set up: the prepared module, optimizer, schedule and loaders, and the
    state a checkpoint keeps (step, best held-out loss, patience, history)."""

    cfg: TrainConfig
    accelerator: Any
    module: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    eval_loader: Any
    has_eval: bool
    weights: Any
    cls: Any
    settings: Any
    lm: Any
    log: Callable
    control_loader: Any = None  # data.eval_control's rows, evaluated beside the held-out rows
    state: dict = field(
        default_factory=lambda: {"step": 0, "best_eval": None, "best_step": None, "bad_evals": 0, "history": []}
    )
    step_times: list = field(default_factory=list)
    logf: Any = None

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.output.dir) / "checkpoints"

    def evaluate(self, loader=None) -> dict:
        """Loss per token of `loader` (default the held-out rows) over every process's share ("loss");
        with negatives also the mean margin log p(right) - log p(wrong) over the held-out pairs
        ("margin") and the objective the best weights are chosen by ("objective": loss +
        margin_weight * mean margin term)."""
        self.module.eval()
        nll_sum, n_sum, m_sum, m_term, m_n = 0.0, 0, 0.0, 0.0, 0
        trainer = self.accelerator.unwrap_model(self.module)
        t = self.cfg.train
        with torch.no_grad():
            for batch in loader if loader is not None else self.eval_loader:
                nll, n, _ = self.module(**batch)
                m = trainer.last_margins if trainer.last_margins is not None else torch.zeros(0)
                stats = torch.stack([m.sum(), F.softplus(t.margin - m).sum(), torch.tensor(float(len(m)))])
                nll, n, stats = self.accelerator.gather_for_metrics((nll.reshape(1), n.reshape(1), stats[None]))
                nll_sum += float(nll.sum())
                n_sum += int(n.sum())
                m_sum += float(stats[:, 0].sum())
                m_term += float(stats[:, 1].sum())
                m_n += int(stats[:, 2].sum())
        self.module.train()
        self.weights.train()
        loss = nll_sum / max(1, n_sum)
        if not m_n:
            return {"loss": loss, "objective": loss}
        return {"loss": loss, "margin": m_sum / m_n, "objective": loss + t.margin_weight * m_term / m_n}

    def save_best(self, path: Path) -> None:
        from .weights import save_weights

        if self.accelerator.is_main_process:
            s, cfg = self.settings, self.cfg
            save_weights(
                path,
                _weights_tensors(self.accelerator.unwrap_model(self.module).weights),
                mechanism=self.cls.name,
                settings=s.model_dump(exclude={"weights", "linkage", "gain"}) | {"gain": s.gain},
                model=self.lm.model,
                identity=self.lm.identity,
                extra={
                    "trained": {
                        "step": self.state["step"],
                        "eval_loss": self.state["best_eval"],
                        "config": cfg.model_dump(),
                    }
                }
                | ({"reader": True} if cfg.data.documents else {}),
            )

    def checkpoint(self) -> None:
        """Accelerate's state plus trainer_state.json; only the newest `keep_checkpoints` are kept."""
        path = self.ckpt_root / f"step-{self.state['step']}"
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path))
        if self.accelerator.is_main_process:
            (path / "trainer_state.json").write_text(json.dumps(self.state))
            old = sorted(self.ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in old[: -self.cfg.output.keep_checkpoints]:
                import shutil

                shutil.rmtree(p, ignore_errors=True)

    def measure(self) -> tuple[dict, float | None]:
        """The held-out evaluation and, with data.eval_control, the control rows' loss per token."""
        result = self.evaluate()
        return result, self.evaluate(self.control_loader)["loss"] if self.control_loader is not None else None

    @staticmethod
    def measured_line(step: int, result: dict, control: float | None) -> str:
        ev = result["loss"]
        return (
            f"step {step}: held-out loss {ev:.4f} (perplexity {math.exp(min(ev, 50)):.2f})"
            + (f", margin right - wrong {result['margin']:+.3f}" if "margin" in result else "")
            + (f", control {control:.4f}" if control is not None else "")
        )

    def held_out(self, record: dict, bar) -> bool:
        """Evaluate, keep the best weights, count patience; True when early stopping says stop."""
        (result, control), state, t = self.measure(), self.state, self.cfg.train
        ev, objective = result["loss"], result["objective"]
        record |= {"eval_loss": ev, "eval_ppl": math.exp(min(ev, 50))}
        if control is not None:
            record["control_loss"] = control
        state["history"].append([state["step"], ev] + ([control] if control is not None else []))
        if "margin" in result:
            record |= {"eval_margin": result["margin"], "eval_objective": objective}
            state.setdefault("margin_history", []).append([state["step"], result["margin"], objective])
        stop = False
        best = state.get("best_objective", state["best_eval"])  # without negatives the objective is the loss
        if best is None or objective < best - t.min_delta:
            state.update(
                best_eval=ev, best_objective=objective, best_step=state["step"], bad_evals=0, control_at_best=control
            )
            self.save_best(self.cfg.weights_path)
        else:
            state["bad_evals"] += 1
            if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                self.log(f"early stop at step {state['step']}: no improvement in {state['bad_evals']} evals")
                stop = True
        bar.write(self.measured_line(state["step"], result, control))
        return stop

    def after_step(self, loss, aux, bar) -> bool:
        """What follows an optimiser step: the bar, the log line, held-out loss, checkpoints.
        True when the run should stop."""
        state, total = self.state, self.cfg.train.max_steps
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        record = {
            "step": state["step"],
            "loss": float(loss.detach()),
            "aux": float(aux.detach()),
            "lr": self.scheduler.get_last_lr()[0],
        }
        stop = False
        if self.has_eval and (state["step"] % self.cfg.train.eval_every == 0 or state["step"] == total):
            stop = self.held_out(record, bar)
        if self.logf:
            self.logf.write(json.dumps(record) + "\n")
            self.logf.flush()
        if self.cfg.output.save_every and state["step"] % self.cfg.output.save_every == 0:
            self.checkpoint()
        return stop or state["step"] >= total

    def micro_step(self, batch):
        """One micro-batch forward and backward; the optimiser steps when accumulation syncs."""
        acc = self.accelerator
        with acc.accumulate(self.module):
            nll, n, aux = self.module(**batch)
            loss = nll / n.clamp_min(1) + aux
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.train.max_grad_norm is not None:
                acc.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.train.max_grad_norm
                )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss, aux

    def loop(self, bar) -> None:
        """Epochs until max_steps or early stopping; a resumed run skips the batches it has seen."""
        per_epoch = len(self.loader)
        micro_done = self.state["step"] * self.cfg.train.grad_accum
        epoch = micro_done // per_epoch
        stop = False
        self.module.train()
        while not stop and self.state["step"] < self.cfg.train.max_steps:
            self.loader.set_epoch(epoch)
            skip = micro_done - epoch * per_epoch
            it = self.accelerator.skip_first_batches(self.loader, skip) if skip > 0 else self.loader
            t_step = time.perf_counter()
            for batch in it:
                loss, aux = self.micro_step(batch)
                micro_done += 1
                if not self.accelerator.sync_gradients:
                    continue
                self.step_times.append(time.perf_counter() - t_step)
                t_step = time.perf_counter()
                stop = self.after_step(loss, aux, bar)
                if stop:
                    break
            epoch += 1

    def summary(self, elapsed: float) -> dict:
        state, times = self.state, self.step_times
        return {
            "steps": state["step"],
            "initial_eval_loss": state.get("initial_eval"),
            "best_eval_loss": state["best_eval"],
            "best_step": state["best_step"],
            "initial_control_loss": state.get("initial_control"),
            "control_loss_at_best": state.get("control_at_best"),
            "weights": str(self.cfg.weights_path),
            "best_perplexity": None if state["best_eval"] is None else math.exp(min(state["best_eval"], 50)),
            "seconds": round(elapsed, 2),
            "median_step_s": round(sorted(times)[len(times) // 2], 4) if times else None,
        } | (
            {"initial_eval_margin": state.get("initial_eval_margin"), "eval_margins": state["margin_history"]}
            if "margin_history" in state
            else {}
        )


def _save_lora(cfg: TrainConfig, base) -> None:
    """LoRA adapters as a peft adapter folder beside the weights file (for offline comparison)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora_dir = Path(str(cfg.weights_path) + ".lora")
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(base).items()},
        str(lora_dir / "adapter_model.safetensors"),
    )
    (lora_dir / "adapter_config.json").write_text(json.dumps(cfg.lora.model_dump()))


def _setup(cfg: TrainConfig, accelerator, lm, resume: str | None, log) -> tuple[_Run, list]:
    """Model, trainable module, LoRA, data, optimizer, all prepared by Accelerate, in the order the
    seeded RNG has always seen them (so a config trains to the same weights); the resumed state."""
    from .mechanisms import MECHANISMS
    from .model import load_model

    if lm is not None and cfg.lora is not None:
        raise ConfigError(["lora: needs a model loaded for this run (LoRA changes the model it is given)"])
    lm = lm or load_model(cfg.model, dtype=cfg.dtype, device=str(accelerator.device), verbose=False)
    base = lm.model
    base.requires_grad_(False)
    base.eval()
    cls = MECHANISMS[cfg.mechanism.name]
    settings = cfg.settings()
    weights = _build_weights(cfg, cls, settings, base, lm)
    lora_params = _inject_lora(cfg, base)
    t = cfg.train
    module = trainer_module(
        base, cls, settings, weights, t.aux_weights, t.window, t.sink, margin_weight=t.margin_weight, margin=t.margin
    )
    loader, eval_loader, has_eval, control_loader = _loaders(cfg, lm.tokenizer)
    optimizer, scheduler = _optimizer(cfg, weights, lora_params)
    module, optimizer, loader, eval_loader, scheduler = accelerator.prepare(
        module, optimizer, loader, eval_loader, scheduler
    )
    run = _Run(
        cfg, accelerator, module, optimizer, scheduler, loader, eval_loader, has_eval, weights, cls, settings, lm, log
    )
    run.control_loader = accelerator.prepare(control_loader) if control_loader is not None else None
    resume = _resume_point(cfg, resume, run.ckpt_root)
    if resume:
        accelerator.load_state(resume)
        run.state = json.loads((Path(resume) / "trainer_state.json").read_text())
        log(f"resumed from {resume} at step {run.state['step']}")
    return run, lora_params


def train(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True, log=print, lm=None) -> dict:
    """Run one training; returns a summary (steps, best eval loss, perplexity, files).

    `lm`: an already loaded model to train on (tests, benchmarks); without LoRA only, since LoRA
    adapters are injected into the model it is given."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output.dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(out_dir), automatic_checkpoint_naming=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run, lora_params = _setup(cfg, accelerator, lm, resume, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    run.logf = open(out_dir / "log.jsonl", "a", encoding="utf-8") if accelerator.is_main_process else None
    if run.state["step"] == 0 and run.has_eval:
        result, control = run.measure()
        run.state |= {"initial_eval": result["loss"], "initial_control": control}
        if "margin" in result:
            run.state["initial_eval_margin"] = result["margin"]
        log(run.measured_line(0, result, control))
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=run.state["step"],
        disable=not (progress and accelerator.is_local_main_process),
        desc=f"train {run.cls.name}",
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    run.loop(bar)
    bar.close()
    if not run.has_eval:
        run.save_best(cfg.weights_path)
    run.checkpoint()
    if run.logf:
        run.logf.close()
    if lora_params and accelerator.is_main_process:
        _save_lora(cfg, run.lm.model)
    summary = run.summary(time.perf_counter() - t_start)
    log(json.dumps(summary))
    return summary


def main(args) -> int:
    """CLI entry (python -m engine train CONFIG.yaml [--resume DIR] [--no-progress])."""
    try:
        cfg = load_config(args.config)
        train(cfg, resume=args.resume, progress=not args.no_progress)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a known failure (a weights file, a model) is one line
        from .model import ModelLoadError
        from .weights import WeightsError

        if isinstance(e, (WeightsError, ModelLoadError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
