"""Why a bank reader does or does not bind person -> town (README "Positive controls", bank reader).
Dev items only.

    python -m studies.bank_reader_diagnose [--reader @bank_reader] [--threads 2]     # ~2 min

For each town question of studies/data/bank_reader/dev.jsonl, over a bank distilled from its
document and read through the reader:

- **where the read looks**: the read weight (mean over heads) at the position that predicts the
  town's first token, summed over the slots of the right town, the wrong town (another person's of
  the same document), the asked person's name and, averaged, another person's name; per layer;
- **what the value path could carry** (an oracle, not an arm anyone should use): the
  right-minus-wrong margin when the bank is masked to only the right town's slots, only the wrong
  town's, only the asked name's, or the asked person's whole "NAME lives in TOWN" span, beside the
  full bank and the observer. A large margin for "right town only" with a flat "full" one means
  the values carry the answer and the read cannot find it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .bank_reader_data import OUT as DATA
from .bank_reader_data import SYSTEM
from .common import reply_logprob, study_args


def main(argv=None) -> None:
    args = study_args(
        __doc__,
        argv,
        12,
        lambda ap: ap.add_argument("--reader", default="@bank_reader", help="reader weights (engine train)"),
    )
    from engine import load_model, parse_arm
    from engine.dialogue import Dialogue
    from engine.distill import distill
    from engine.weights import load_tensors, read_header, resolve_path, save_weights

    lm = load_model(verbose=False)
    tok = lm.tokenizer
    reader = resolve_path(args.reader)
    layers = read_header(reader).settings["layers"]
    rows = [json.loads(line) for line in (DATA / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("wrong")][: args.items]
    tmp = Path(tempfile.mkdtemp(prefix="bank_diagnose_"))

    def slots_of(doc: str, words: str) -> list[int]:
        offsets = tok(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        start = doc.index(words)
        return [k for k, (a, b) in enumerate(offsets) if a < start + len(words) and b > start]

    def masked(bank: Path, keep: list[int], name: str) -> Path:
        wf = read_header(bank)
        tensors = load_tensors(wf)
        for key in [k for k in tensors if k.endswith(".mask")]:
            tensors[key] = torch.zeros_like(tensors[key])
            tensors[key][keep] = True
        save_weights(
            tmp / name, tensors, mechanism=wf.mechanism, settings=wf.settings, model=lm.model,
            identity=lm.identity, extra=wf.extra,
        )  # fmt: skip
        return tmp / name

    looks = {l: np.zeros(4) for l in layers}
    oracle: dict[str, list[float]] = {}
    for r in rows:
        question, doc = r["messages"][1]["content"], r["document"]
        person = re.fullmatch(r"Where does (.+) live\?", question).group(1)  # type: ignore[union-attr]
        others = [p for p in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) lives in", doc) if p != person]
        right_ids, wrong_ids = (tok(a, add_special_tokens=False)["input_ids"] for a in (r["answer"], r["wrong"]))
        bank = tmp / "doc.safetensors"
        distill(lm, doc, "memory_bank:layers=" + "/".join(map(str, layers)), out=bank)
        spec = parse_arm(f'memory_bank:linkage=1,weights="{bank}",reader="{reader}"')

        d = Dialogue(lm, [spec], system=SYSTEM, record_traces=True)
        d.teacher_force(question, [right_ids])
        traces = d.arms[0].mechanism.traces
        groups = [
            slots_of(doc, r["answer"]),
            slots_of(doc, r["wrong"]),
            slots_of(doc, person),
            [k for p in others for k in slots_of(doc, p)],
        ]
        for l in layers:
            ts = sorted((t for t in traces if t.layer == l), key=lambda t: t.position)
            w = ts[-len(right_ids)].weights  # the prompt's last position: it predicts the town's first token
            looks[l] += [w[g].sum() / (len(others) if i == 3 else 1) for i, g in enumerate(groups)]

        town, name = groups[0], groups[2]
        banks = {
            "full bank": bank,
            "right town only": masked(bank, town, "right.safetensors"),
            "wrong town only": masked(bank, groups[1], "wrong.safetensors"),
            "asked name only": masked(bank, name, "name.safetensors"),
            "'NAME lives in TOWN' only": masked(bank, list(range(name[0], town[-1] + 1)), "span.safetensors"),
        }
        specs = [parse_arm("observer")] + [
            parse_arm(f'memory_bank:linkage=1,weights="{b}",reader="{reader}"') for b in banks.values()
        ]
        logits = Dialogue(lm, [s for s in specs for _ in (0, 1)], system=SYSTEM).teacher_force(
            question, [right_ids, wrong_ids] * len(specs)
        )
        lp = [reply_logprob(x, t) for x, t in zip(logits, [right_ids, wrong_ids] * len(specs))]
        for k, label in enumerate(["observer", *banks]):
            oracle.setdefault(label, []).append(lp[2 * k] - lp[2 * k + 1])
    shutil.rmtree(tmp, ignore_errors=True)

    n = len(rows)
    print(f"reader {args.reader}, {n} dev town questions")
    print("read weight at the answer's first position (mean over heads), summed over slots of:")
    print(f"  {'layer':6s} {'right town':>11s} {'wrong town':>11s} {'asked name':>11s} {'another name':>13s}")
    for l in layers:
        a = looks[l] / n
        print(f"  {l:<6d} {a[0]:11.3f} {a[1]:11.3f} {a[2]:11.3f} {a[3]:13.3f}")
    print("margin log p(right town) - log p(wrong town), nats (oracle masks: not arms):")
    for label, m in oracle.items():
        v = np.array(m)
        print(f"  {label:28s} {v.mean():+7.2f}   positive {(v > 0).sum()}/{n}")
    if args.out:
        Path(args.out).write_text(json.dumps({"looks": {l: list(looks[l] / n) for l in layers}, "oracle": oracle}))


if __name__ == "__main__":
    main()
