"""Train the neural memory's persistent tokens for recall *beyond an attention window*.

README table: "Persistent tokens trained through the window" (under "Recall beyond the window").
Running time: about 6 minutes on 2 busy cores (--window 32 --steps 40, README).

    python -m studies.persistent_window --window 32 --steps 40 --threads 1
    python -m studies.window_recall --windows 32,none --arm observer \\
        --arm 'neural_memory:linkage=1,weights="runs/persistent_window/persistent.safetensors"'

`python -m engine train` trains with full attention; here each training sequence is one synthetic
dialogue of the `window_recall` shape (a fact planted in turn 1, the protocol's three distractor
turns with the fixed replies of studies/window_recall.py, then the question) seen through a
sliding attention window: every token attends to the first 4 tokens (the sink) and the last
`--window` tokens only, so the fact can reach the answer only through the memory. The loss is the
answer's tokens alone. Facts, names and values are disjoint from the protocol's 12 items (the
evaluation set); a held-out split of the synthetic facts is scored every `--eval-every` steps. Only
the persistent tokens train (frozen model, fixed memory settings); the output is a lab weights file.

A lower answer loss alone could be a better *prior* (answers are short names, numbers, days), not
recall. So the held-out dialogues are also scored with a *mismatched* fact planted (the same
attribute, another value): only what the arm recalls from the planted fact separates the two
(recall signal = mismatched − matched answer loss, nats per answer token), for the observer
(gain 0), the memory without persistent tokens, with the untrained and with the trained ones.
Everything measured is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from engine.train import window_mask  # noqa: F401  (the trainer's sliding window, used here too)

ATTRS = [  # (fact, question, values): none of the protocol's items
    (
        "My neighbour is called {v}.",
        "What is my neighbour called?",
        ["Tobias", "Marguerite", "Ingrid", "Rafael", "Yusuf", "Beatrix"],
    ),
    ("The parcel is in locker {v}.", "Which locker is the parcel in?", ["318", "562", "904", "127", "746", "283"]),
    (
        "My aunt lives in {v}.",
        "In which city does my aunt live?",
        ["Vienna", "Oslo", "Seville", "Krakow", "Dublin", "Porto"],
    ),
    (
        "The wifi password is {v}.",
        "What is the wifi password?",
        ["falcon", "juniper", "copper", "saffron", "harbor", "velvet"],
    ),
    (
        "My favourite vegetable is the {v}.",
        "What is my favourite vegetable?",
        ["leek", "turnip", "radish", "fennel", "parsnip", "celery"],
    ),
    ("My bike is painted {v}.", "What colour is my bike?", ["green", "purple", "yellow", "silver", "crimson", "teal"]),
    ("Our parrot is named {v}.", "What is our parrot named?", ["Kiwi", "Nugget", "Pixel", "Rocco", "Sunny", "Ziggy"]),
    (
        "My dentist appointment is on {v}.",
        "On which day is my dentist appointment?",
        ["Monday", "Tuesday", "Wednesday", "Friday", "Saturday", "Sunday"],
    ),
    (
        "My chess coach is Mr {v}.",
        "What is my chess coach's name?",
        ["Haddad", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Kowalski"],
    ),
    (
        "I take tram number {v} to school.",
        "Which tram number do I take to school?",
        ["12", "45", "68", "91", "27", "54"],
    ),
]


def make_items(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): every value of every attribute is one item; the held-out split takes one
    value per attribute."""
    rng = random.Random(seed)
    train, held = [], []
    for fact, question, values in ATTRS:
        vals = list(values)
        rng.shuffle(vals)
        for k, v in enumerate(vals):
            (held if k == 0 else train).append({"fact": fact.format(v=v), "question": question, "answer": v})
    rng.shuffle(train)
    return train, held


def mismatched(held: list[dict], train: list[dict]) -> list[dict]:
    """Each held-out item with another value of the same attribute planted (the answer stays)."""
    out = []
    for it in held:
        other = next(t for t in train if t["question"] == it["question"] and t["answer"] != it["answer"])
        out.append({**it, "fact": other["fact"]})
    return out


def dialogue_messages(protocol, item: dict) -> list[dict]:
    from studies.common import FIXED_REPLIES

    turns = [t.replace("{fact}", item["fact"]).replace("{question}", item["question"]) for t in protocol.turns]
    msgs = []
    for k, user in enumerate(turns[:-1]):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": FIXED_REPLIES[k % 4]}]
    return msgs + [{"role": "user", "content": turns[-1]}, {"role": "assistant", "content": item["answer"]}]


def encode_item(tok, protocol, item: dict) -> dict:
    """Token ids and roles of the dialogue; labels only on the final answer's tokens."""
    from engine.mechanisms.base import ROLE_CODE
    from engine.train import encode

    enc = encode(tok, {"messages": dialogue_messages(protocol, item)}, 4096, "assistant")
    answer = tok(item["answer"], add_special_tokens=False).input_ids
    ids = enc["ids"]
    start = max(i for i in range(len(ids) - len(answer) + 1) if ids[i : i + len(answer)] == answer)
    labels = [-100] * len(ids)
    labels[start : start + len(answer)] = answer
    assert enc["roles"][start] == ROLE_CODE["assistant"]
    return {"ids": ids, "roles": enc["roles"], "labels": labels}


def answer_loss(lm, settings, weights, window: int):
    """The trainer's loss module (`engine.train`: the frozen base with one neural memory bound per
    row, each row's plan applied, the sliding window): `module(**batch) -> (nll, n_tokens, aux)`,
    the summed NLL of the answer tokens with the persistent tokens' gradient on the graph."""
    from engine.mechanisms.neural_memory import NeuralMemory
    from engine.train import trainer_module

    return trainer_module(lm.model, NeuralMemory, settings, weights, {}, window or None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.persistent_window", description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=32, help="attention window during training (0: full attention)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.03, help="AdamW learning rate of the persistent tokens")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--settings",
        default="layers=16/22/28,gain=1,wiring=layer,lr=0.5,persistent=8",
        help="neural_memory settings (persistent=P > 0)",
    )
    p.add_argument("--out", default="runs/persistent_window/persistent.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from engine import load_model, parse_arm
    from engine.mechanisms.neural_memory import NeuralMemory
    from engine.train import collate
    from engine.weights import save_weights
    from experiments.protocol import get_protocol

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = parse_arm(f"neural_memory:linkage=1,{args.settings}").settings
    if not settings.persistent:
        print("error: --settings must give persistent=P with P >= 1", file=sys.stderr)
        return 2
    lm = load_model(verbose=False)
    lm.model.requires_grad_(False)
    protocol = get_protocol("window_recall")
    train_items, held_items = make_items(args.seed)
    tok = lm.tokenizer
    enc = [encode_item(tok, protocol, it) for it in train_items]
    enc_held = [encode_item(tok, protocol, it) for it in held_items]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    weights = NeuralMemory.build_weights(settings, lm.model, None)
    weights.requires_grad_(True)
    module = answer_loss(lm, settings, weights, args.window)
    opt = torch.optim.AdamW(weights.parameters(), lr=args.lr, weight_decay=0.0)

    def arm_loss(s, w, items) -> float:
        with torch.no_grad():
            nll, n, _ = answer_loss(lm, s, w, args.window)(
                **collate([encode_item(tok, protocol, it) for it in items], pad)
            )
        return float(nll) / int(n)

    def held_out() -> float:
        with torch.no_grad():
            nll, n, _ = module(**collate(enc_held, pad))
        return float(nll) / int(n)

    rng = random.Random(args.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    first = held_out()
    history = [(0, first)]
    print(
        f"step 0: held-out answer loss {first:.4f} (window {args.window or 'full'}, {len(enc)} train / "
        f"{len(enc_held)} held-out dialogues, {min(len(e['ids']) for e in enc)}-{max(len(e['ids']) for e in enc)} "
        f"tokens)",
        flush=True,
    )
    best = (first, 0, {k: v.detach().clone() for k, v in weights.state_dict().items()})
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(enc)), len(enc))
        idx, order = order[: args.batch_size], order[args.batch_size :]
        nll, n, _ = module(**collate([enc[i] for i in idx], pad))
        loss = nll / max(1, int(n))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            ev = held_out()
            history.append((step, ev))
            print(
                f"step {step}: train loss {float(loss.detach()):.4f}, held-out answer loss {ev:.4f} "
                f"[{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
            if ev < best[0]:
                best = (ev, step, {k: v.detach().clone() for k, v in weights.state_dict().items()})
    # the recall control: matched vs mismatched planted fact, per arm
    from engine.mechanisms.neural_memory import PersistentTokens

    wrong = mismatched(held_items, train_items)
    none = settings.model_copy(update={"persistent": 0})
    initial = NeuralMemory.build_weights(settings, lm.model, None)
    trained = PersistentTokens({int(k.split(".")[1]): v for k, v in best[2].items()})
    print(f"held-out answer loss (nats/token), window {args.window or 'full'}; recall signal = mismatched - matched:")
    for name, s, w in (
        ("observer (gain 0)", none.model_copy(update={"gain": 0.0}), None),
        ("memory, no persistent tokens", none, None),
        ("memory + untrained persistent", settings, initial),
        ("memory + trained persistent", settings, trained),
    ):
        a, b = arm_loss(s, w, held_items), arm_loss(s, w, wrong)
        print(f"  {name:32s} matched {a:.4f}  mismatched {b:.4f}  recall signal {b - a:+.4f}", flush=True)
    out = Path(args.out)
    save_weights(
        out,
        best[2],
        mechanism="neural_memory",
        settings=settings.model_dump(exclude={"weights", "linkage", "gain"}) | {"gain": settings.gain},
        model=lm.model,
        identity=lm.identity,
        extra={
            "trained": {
                "by": "studies.persistent_window",
                "window": args.window,
                "step": best[1],
                "held_out_answer_loss": best[0],
                "history": history,
            }
        },
    )
    print(
        json.dumps(
            {
                "initial_held_out": first,
                "best_held_out": best[0],
                "best_step": best[1],
                "weights": str(out),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
