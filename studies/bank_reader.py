"""Does one trained reader read any distilled document? (README "Positive controls", row "bank reader")

    python -m studies.bank_reader [--reader @bank_reader] [--items 120] [--threads 1]     # ~10 min, 2 cores
    python -m studies.bank_reader --split dev ...    # the 12 dev questions: for choosing a reader, never test

For each held-out document (studies/data/bank_reader/test.jsonl: invented people and towns never
seen in training) a bank is distilled here with `engine.distill.distill` (what `python -m engine
distill DOC --arm "memory_bank:layers=..."` runs), on the reader's layers. Each question
("Where does <person> live?", no document in context) is put to five arms:

- observer (no memory);
- reader: the distilled bank of the document asked about, read through the trained reader;
- other document (negative control): the same reader over a bank distilled from a different
  test document (the next one), so a gain that does not need the right document shows here;
- no reader: the distilled bank of the right document read through the layer's own W_q / W_k
  (the untrained same-settings control);
- noise matched to the reader arm (`noise:match=...`): a random residual of the same norm per
  token and layer;
- fresh reader (only for a reader with `reader_match`, which reads differently from "no reader" even
  untrained): an untrained reader with the same settings, the right document.

Measured per arm: the right-minus-wrong margin, log p(the person's town) - log p(another person's
town of the same document), both teacher-forced as the reply; log p(right town); and answer_match
of the greedy reply (8 new tokens). 95% intervals: bootstrap over documents (the three questions
of a document resampled together); differences are paired with the observer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .bank_reader_data import OUT as DATA
from .bank_reader_data import SYSTEM
from .common import reply_logprob, study_args, test_items


def arms_for(doc: str, other: str, fresh: bool = False) -> list[tuple[str, str]]:
    reader = f"memory_bank:linkage=1,weights=@{doc},reader=@bank_reader"
    arms = [
        ("observer", "observer"),
        ("reader", reader + ",label=reader"),
        ("other document", f"memory_bank:linkage=1,weights=@{other},reader=@bank_reader,label=other document"),
        ("no reader", f"memory_bank:linkage=1,weights=@{doc},label=no reader"),
        ("noise matched", f'noise:match="{reader}",label=noise matched'),
    ]
    if fresh:
        arms.append(("fresh reader", f"memory_bank:linkage=1,weights=@{doc},reader=@fresh_reader,label=fresh reader"))
    return arms


def fresh_reader(lm, reader: Path, out: Path) -> bool:
    """Write an untrained reader with `reader`'s settings to `out`; False when a fresh one would read
    as "no reader" does (no similarity match: LoRA and window maps start at zero)."""
    from engine.mechanisms.memory_bank import MemoryBank, ReaderWeights
    from engine.weights import read_header, save_weights

    wf = read_header(reader)
    settings = MemoryBank.Settings.model_validate(wf.settings)
    if not settings.reader_match:
        return False
    save_weights(
        out,
        ReaderWeights(settings, lm.model).to_tensors(),
        mechanism="memory_bank",
        settings=wf.settings,
        model=lm.model,
        identity=lm.identity,
        extra={"reader": True},
    )
    return True


def main(argv=None) -> None:
    args = study_args(
        __doc__,
        argv,
        120,
        lambda ap: (
            ap.add_argument(
                "--reader", default="@bank_reader", help="reader weights (engine train, data.documents: true)"
            ),
            ap.add_argument(
                "--split",
                choices=["test", "dev"],
                default="test",
                help="questions from test.jsonl (the README's rows) or dev.jsonl (town questions only)",
            ),
        ),
    )

    from engine import load_model, parse_arm
    from engine.dialogue import Dialogue
    from engine.distill import distill
    from engine.weights import read_header, resolve_path
    from experiments.scoring import answer_match
    from experiments.stats import bootstrap_ci

    lm = load_model(verbose=False)
    tok = lm.tokenizer
    reader = resolve_path(args.reader)
    layers = "/".join(str(l) for l in read_header(reader).settings["layers"])
    items = [it for it in test_items(DATA, args.items, args.split) if it["kind"] == "town"]
    docs = list(dict.fromkeys(it["doc_id"] for it in items))
    text = {it["doc_id"]: it["document"] for it in items}
    tmp = Path(tempfile.mkdtemp(prefix="bank_reader_"))
    shutil.copy(reader, tmp / "bank_reader.safetensors")
    fresh = fresh_reader(lm, reader, tmp / "fresh_reader.safetensors")
    os.environ["LAB_WEIGHTS_DIR"] = str(tmp)
    t0 = time.perf_counter()
    for d in docs:
        distill(lm, text[d], f"memory_bank:layers={layers}", out=tmp / f"{d}.safetensors", source_name=d)
    print(f"distilled {len(docs)} test documents (layers {layers}) in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    rows = []
    for it in items:
        other = docs[(docs.index(it["doc_id"]) + 1) % len(docs)]
        arms = arms_for(it["doc_id"], other, fresh)
        specs = [parse_arm(s) for _, s in arms]
        question = it["messages"][1]["content"]
        right, wrong = (tok(a, add_special_tokens=False)["input_ids"] for a in (it["answer"], it["wrong"]))
        d = Dialogue(lm, [s for s in specs for _ in (0, 1)], system=SYSTEM)
        logits = d.teacher_force(question, [right, wrong] * len(specs))
        lp = [reply_logprob(l, r) for l, r in zip(logits, [right, wrong] * len(specs))]
        replies = Dialogue(lm, specs, system=SYSTEM).send(question, max_new_tokens=8)
        for k, (name, _) in enumerate(arms):
            rows.append(
                {
                    "item": it["id"],
                    "doc": it["doc_id"],
                    "arm": name,
                    "logp_right": lp[2 * k],
                    "logp_wrong": lp[2 * k + 1],
                    "margin": lp[2 * k] - lp[2 * k + 1],
                    "match": bool(answer_match(replies[k].text, it["answer"])["matched"]),
                    "reply": replies[k].text,
                }
            )
    print(f"{len(items)} questions x {len(arms)} arms in {time.perf_counter() - t0:.0f} s")

    by = {name: [r for r in rows if r["arm"] == name] for name, _ in arms_for("x", "y", fresh)}
    obs = by["observer"]
    clusters = [r["doc"] for r in obs]
    print(f"\n{len(items)} held-out questions over {len(docs)} documents; 95% bootstrap intervals over documents")
    print(
        f"{'arm':16s} {'margin right-wrong':>26s} {'log p(right)':>24s} {'answer_match':>22s} {'match - observer':>22s}"
    )
    summary = {}
    for name, rs in by.items():
        m = bootstrap_ci(np.array([r["margin"] for r in rs]), clusters=clusters)
        p = bootstrap_ci(np.array([r["logp_right"] for r in rs]), clusters=clusters)
        a = bootstrap_ci(np.array([float(r["match"]) for r in rs]), clusters=clusters)
        da = bootstrap_ci(np.array([float(r["match"]) - float(o["match"]) for r, o in zip(rs, obs)]), clusters=clusters)
        summary[name] = {"margin": m, "logp_right": p, "answer_match": a, "match_minus_observer": da}
        print(
            f"{name:16s} {m[0]:+7.2f} [{m[1]:+6.2f}, {m[2]:+6.2f}]   {p[0]:7.2f} [{p[1]:7.2f}, {p[2]:7.2f}]"
            f"   {a[0]:5.2f} [{a[1]:.2f}, {a[2]:.2f}]   {da[0]:+5.2f} [{da[1]:+.2f}, {da[2]:+.2f}]"
        )
    print("\nreader margin minus another arm's, paired by question (95% bootstrap over documents):")
    for name, rs in by.items():
        if name != "reader":
            diff = [r["margin"] - o["margin"] for r, o in zip(by["reader"], rs)]
            d = bootstrap_ci(np.array(diff), clusters=clusters)
            summary[f"reader_minus_{name}"] = d
            print(f"  reader - {name:14s} {d[0]:+7.2f} [{d[1]:+6.2f}, {d[2]:+6.2f}]")
    print("\nfirst replies:")
    for name, rs in by.items():
        print(
            f"  {name}: "
            + " | ".join(repr(r["reply"].strip()[:30]) for r in rs[:3])
            + f"   (answers: {', '.join(it['answer'] for it in items[:3])})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
