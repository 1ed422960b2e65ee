"""Dialogues per minute of a sweep: the plain runner vs Ray with 1 and 2 local actors.

    python -m bench.scale_bench [--items 20] [--max-new-tokens 24] [--arm SPEC ...] [--modes plain,ray1,ray2]

Every mode runs the same `are_you_sure` sweep (items x 1 seed, each dialogue all arms batched) into
its own scratch SQLite file, on the embedded model. Reported per mode: dialogues/min over the
dialogues alone (first dialogue started to last written), and the fixed cost around them: the
plain runner's model load, or Ray's start-up (a local instance, 80 MiB object store) plus the time
until every actor has loaded its model, the peak resident memory of the driver and of each
actor, and (Ray) the median time of the driver's one write transaction per dialogue. Actors get
one torch thread each (the plain runner gets --threads, default 2), so on a 2-core machine 2
actors use the same cores the plain runner does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ["observer", "continuity:linkage=1,gain=0.3"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain(args, db) -> dict:
    import torch

    from db import Store
    from engine import load_model
    from experiments.runner import run_protocol

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(verbose=False)
    loaded = time.perf_counter()
    marks = []
    run_protocol(
        Store(db),
        lm,
        args.protocol,
        args.arm,
        items=args.items,
        max_new_tokens=args.max_new_tokens,
        progress=lambda d, t, i: marks.append(time.perf_counter()),
    )
    return {
        "fixed_s": loaded - t0,
        "dialogues_s": marks[-1] - marks[0],
        "n": len(marks) - 1,
        "driver_rss_mib": peak_rss_mib(),
        "actor_rss_mib": [],
    }


def on_ray(args, db, actors) -> dict:
    from db import Store
    from experiments import distributed

    writes = []

    class TimedStore(Store):  # the driver's one transaction per dialogue, timed
        def log_dialogue(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().log_dialogue(*a, **k)
            finally:
                writes.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    ray, started = distributed.start_ray(num_cpus=actors)
    ray_up = time.perf_counter()
    marks, rss = [], []
    real_describe = distributed._Actors.describe

    def describe(self):  # the moment every actor has its model loaded ends the fixed cost
        out = real_describe(self)
        marks.append(time.perf_counter())
        return out

    distributed._Actors.describe = describe
    real_kill = distributed._Actors.kill_all

    def kill_all(self):  # each actor's peak memory, read before it goes
        rss.extend(ray.get([a.peak_rss_mib.remote() for a in self.live]))
        real_kill(self)

    distributed._Actors.kill_all = kill_all
    try:
        distributed.run_protocol_ray(
            TimedStore(db),
            args.protocol,
            args.arm,
            items=args.items,
            max_new_tokens=args.max_new_tokens,
            actors=actors,
            progress=lambda d, t, i: marks.append(time.perf_counter()),
        )
    finally:
        distributed._Actors.describe, distributed._Actors.kill_all = real_describe, real_kill
        if started:
            ray.shutdown()
    # marks: actors ready, start event, then one per dialogue
    return {
        "ray_start_s": ray_up - t0,
        "fixed_s": marks[0] - t0,
        "dialogues_s": marks[-1] - marks[1],
        "n": len(marks) - 2,
        "driver_rss_mib": peak_rss_mib(),
        "actor_rss_mib": rss,
        "write_ms_median": 1000 * sorted(writes)[len(writes) // 2],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.split("\n")[0])
    p.add_argument("--protocol", default="are_you_sure")
    p.add_argument("--arm", action="append", default=None)
    p.add_argument("--items", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain runner")
    p.add_argument("--modes", default="plain,ray1,ray2")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.arm = args.arm or ARMS
    modes = args.modes.split(",")
    if len(modes) > 1:  # one process per mode: each peak memory is its own
        out = {}
        for mode in modes:
            cmd = [
                sys.executable,
                "-m",
                "bench.scale_bench",
                "--modes",
                mode,
                "--json",
                "--items",
                str(args.items),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--threads",
                str(args.threads),
                "--protocol",
                args.protocol,
                *[x for a in args.arm for x in ("--arm", a)],
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            print(r.stdout.splitlines()[0], flush=True)
            out.update(json.loads(r.stdout.splitlines()[-1]))
        if args.json:
            print(json.dumps(out))
        return 0
    out = {}
    with tempfile.TemporaryDirectory(prefix="scale_bench_") as tmp:
        for mode in modes:
            db = Path(tmp) / f"{mode}.db"
            r = plain(args, db) if mode == "plain" else on_ray(args, db, int(mode.removeprefix("ray")))
            r["dialogues_per_min"] = 60 * r["n"] / r["dialogues_s"]
            out[mode] = r
            print(
                f"{mode:6s} {r['dialogues_per_min']:6.2f} dialogues/min  ({r['n']} in {r['dialogues_s']:.1f} s)  "
                f"fixed {r['fixed_s']:.1f} s"
                + (f" (Ray up {r['ray_start_s']:.1f} s)" if "ray_start_s" in r else "")
                + f"  driver peak {r['driver_rss_mib']:.0f} MiB"
                + (
                    f"  actors peak {', '.join(f'{x:.0f}' for x in r['actor_rss_mib'])} MiB"
                    if r["actor_rss_mib"]
                    else ""
                )
                + (f"  driver write {r['write_ms_median']:.1f} ms/dialogue (median)" if "write_ms_median" in r else ""),
                flush=True,
            )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
