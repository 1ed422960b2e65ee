"""Chat-template plumbing: which tokens a turn appends, and the role of every token.

A dialogue's token sequence is built incrementally and is the source of truth (it is never
re-tokenised): the first turn is the rendered prompt; each later turn appends only what the
template puts between the model's reply and the next generation prompt. That piece is found by
rendering the template with a sentinel in place of the last reply, so any template that copies
message contents verbatim works without knowing its syntax.
Roles: 'system' and 'user' for the contents of those messages, 'assistant' for generated tokens,
'template' for everything the chat template adds around them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mechanisms.base import ROLE_CODE

_SENTINEL = "\u2063LAB-REPLY\u2063"


@dataclass
class Piece:
    """Tokens to append for one turn, with a role code per token."""

    token_ids: list[int]
    roles: list[int]
    text: str


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize_with_roles(tokenizer, text: str, spans: list[tuple[int, int, str]]) -> Piece:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    roles = []
    for start, end in enc["offset_mapping"]:
        role = "template"
        for s, e, r in spans:
            if start < e and end > s and end > start:
                role = r
                break
        roles.append(ROLE_CODE[role])
    return Piece(list(enc["input_ids"]), roles, text)


def _span(text: str, content: str, start_at: int, role: str):
    if not content:
        return None
    i = text.find(content, start_at)
    return None if i < 0 else (i, i + len(content), role)


def first_turn(tokenizer, system: str | None, user: str) -> Piece:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = _render(tokenizer, messages, True)
    spans, cursor = [], 0
    for m in messages:
        span = _span(text, m["content"], cursor, m["role"])
        if span:
            spans.append(span)
            cursor = span[1]
    return _tokenize_with_roles(tokenizer, text, spans)


def next_turn(tokenizer, messages: list[dict], user: str, reply_token_ids: list[int]) -> Piece:
    """Tokens between the last assistant reply (already in the sequence) and the next generation prompt.

    `messages` ends with the assistant message whose tokens are `reply_token_ids`.
    """
    probe = [*messages[:-1], {"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": user}]
    text = _render(tokenizer, probe, True)
    cut = text.rfind(_SENTINEL)
    if cut < 0:
        raise ValueError(
            "this chat template does not copy assistant messages verbatim; multi-turn dialogue needs one that does"
        )
    suffix = text[cut + len(_SENTINEL) :]
    # The reply may already end in the end-of-turn token the template would add after it.
    reply_tail = tokenizer.decode(reply_token_ids[-1:], skip_special_tokens=False) if reply_token_ids else ""
    if reply_tail and reply_token_ids[-1] in tokenizer.all_special_ids and suffix.startswith(reply_tail):
        suffix = suffix[len(reply_tail) :]
    spans = [s for s in [_span(suffix, user, 0, "user")] if s]
    return _tokenize_with_roles(tokenizer, suffix, spans)
