"""Seed 000's question: does a stronger memory of its own earlier answers make the model resist
revising its stance? (README "Stance revision: seed 000's question")

README table and figure: "Stance revision: seed 000's question" (figures/stance_revision/).
Running time: about 1-2 min per dialogue (4 arms, 5 turns, 128 new tokens per reply) on a quiet
2-core CPU, so ~40 min per seed of 24 items; at load 12+ under nice 19 one turn took 15-25 min.

    python -m studies.stance_revision [--seeds 2] [--db runs/stance_revision.db] [--threads 2]

Plays the shipped `stance_revision` protocol (take a stance, list the arguments against it,
revise it, name contradictions, summarise) to four arms at once, all sampling (greedy=false,
temperature 0.7, top-p 0.95) with the dialogue's seed: the observer, continuity at linkage 0.5 and
1 (gain 0.3: gain and linkage enter only as their product), and noise matched to continuity at
linkage 1 (a random residual of the same norm per token and layer). The run is the ordinary
`python -m experiments run` record (seed-major, so a run stopped early holds whole seeds over all
24 items), scored by the default stance judge. It prints the per-arm summary (final stance revised
/ reversed with item-bootstrap 95% intervals and exact McNemar tests paired with the observer over
the same (item, seed) dialogues), writes the figure and a JSON of the summary, and with
`--sample N` writes N dialogues' replies (unlabelled, GUIDE.md format) for labelling by hand.
Running again resumes the newest unfinished run of the same configuration (as the CLI does).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

PROTOCOL = "stance_revision"
MATCHED = "continuity:linkage=1,gain=0.3"
SAMPLING = "greedy=false"
ARMS = [
    f"observer:{SAMPLING}",
    f"continuity:linkage=0.5,gain=0.3,{SAMPLING}",
    f"{MATCHED},{SAMPLING}",
    f'noise:match="{MATCHED}",{SAMPLING}',
]
FIGURES = Path("figures/stance_revision")
METRICS = ("revised_final", "reversed_final", "turn_of_flip", "n_flips")


def run(db: str, seeds: int, items: int | None) -> tuple[object, str]:
    """Run (or resume) the study's experiment; returns (store, run id)."""
    from db import Store
    from engine import load_model
    from experiments.runner import find_matching_run, make_config, run_protocol

    store = Store(db)
    lm = load_model()
    match = find_matching_run(store, make_config(PROTOCOL, ARMS, seeds, items), lm.identity.weights_hash)
    experiment_id = match["id"] if match else None  # the same command resumes its run, as the CLI does
    t0 = time.time()

    def progress(done: int, total: int, info: dict) -> None:
        print(
            f"[{time.time() - t0:7.0f} s] {done}/{total} dialogues {info.get('item', '')} seed {info.get('seed', '')}",
            file=sys.stderr,
            flush=True,
        )

    run_id = run_protocol(
        store,
        lm,
        PROTOCOL,
        ARMS,
        seeds=seeds,
        items=items,
        progress=progress,
        experiment_id=experiment_id,
        name="stance_revision study (seed 000)",
    )
    print(f"run {run_id}: {time.time() - t0:.0f} s", file=sys.stderr)
    return store, run_id


def report(store, run_id: str, out: Path) -> dict:
    """Print the summary, write the figure (PNG, SVG, HTML) and the summary JSON."""
    from experiments.analysis import export_figures, fig_metric_by_arm, format_summary, summary

    s = summary(store, run_id)
    print(format_summary(s, all_metrics=True))
    figs = {
        "revised_final": fig_metric_by_arm(s, "revised_final"),
        "reversed_final": fig_metric_by_arm(s, "reversed_final"),
    }
    out.mkdir(parents=True, exist_ok=True)
    written, failed = export_figures(figs, out, stem="stance_revision", formats=("png", "svg"))
    print("figures:", *written, *(f"(not written: {f})" for f in failed), file=sys.stderr)
    compact = {
        "run_id": run_id,
        "arms": [
            {
                "arm": a["arm"],
                **{k: a["metrics"].get(k) for k in METRICS},
                "vs_observer": {k: a["vs_first"].get(k) for k in METRICS},
            }
            for a in s.get("arms", [])
        ],
    }
    (out / "summary.json").write_text(json.dumps(compact, indent=1, default=str) + "\n")
    return s


def sample(store, run_id: str, n: int, path: Path, seed: int = 0) -> None:
    """n random (item, seed, arm) dialogues' stance-turn replies, unlabelled (GUIDE.md format), in a
    shuffled order with neutral ids so the labeller reads them shuffled; arm and run kept in `source`."""
    from experiments.analysis import results_frame

    exp = store.get_experiment(run_id)
    questions = {str(i.get("id")): i.get("question") for i in (exp["protocol"] or {}).get("items", [])}
    df = results_frame(store, run_id, annotations=False)
    stance_turns = (exp["protocol"] or {}).get("stance_turns") or sorted(df["turn"].unique())
    df = df[df["turn"].isin(stance_turns)]  # the replies the run's judge calls (GUIDE.md: one label each)
    groups = sorted(df.groupby(["item", "seed", "arm_index"]), key=lambda kv: kv[0])
    rng = random.Random(seed)
    chosen = rng.sample(groups, min(n, len(groups)))
    with open(path, "w", encoding="utf-8") as f:
        for k, ((item, s, arm), g) in enumerate(chosen):
            g = g.sort_values("turn")
            f.write(
                json.dumps(
                    {
                        "id": f"{PROTOCOL}/sample{k:02d}",
                        "question": questions.get(item),
                        "turns": [str(t) for t in g["text"].fillna("")],
                        "labels": [None] * len(g),
                        "source": {
                            "kind": "run",
                            "protocol": PROTOCOL,
                            "item": item,
                            "seed": int(s),
                            "arm": g["arm_spec"].iloc[0],
                            "run_id": run_id,
                        },
                    }
                )
                + "\n"
            )
    print(f"wrote {len(chosen)} dialogues to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--items", type=int, default=None, help="first K items (default all 24)")
    p.add_argument("--db", default="runs/stance_revision.db")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(FIGURES))
    p.add_argument("--sample", type=int, default=0, help="write N unlabelled dialogues for hand labels")
    p.add_argument("--sample-file", default="data/stance_labels/stance_study_sample.unlabelled.jsonl")
    p.add_argument("--report-only", default=None, metavar="RUN_ID", help="no generation: report a stored run")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        from db import Store

        store, run_id = Store(args.db, create=False), args.report_only
    else:
        store, run_id = run(args.db, args.seeds, args.items)
    report(store, run_id, Path(args.out))
    if args.sample:
        sample(store, run_id, args.sample, Path(args.sample_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
