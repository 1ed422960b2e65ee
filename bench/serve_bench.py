"""The lab server under concurrent researchers, against the engine running the same rows as one batch.

    python -m bench.serve_bench [--sessions 1,4,8,16] [--new-tokens 8] [--turns 2] [--reps 1]

A real lab server (`app.py` in its own process, a fresh SQLite file, the embedded model) and N real
HTTP clients (gradio_client, one browser session each, in this process) that all send at once: each client plays
`--turns` turns of `--new-tokens` tokens per arm with the Arena's default two arms, greedy, every
turn logged. The baseline is the engine alone: one `Dialogue` holding the same 2N rows (the same
arm specs and messages, so the same tokens), i.e. the best the model can do for that load. Printed
per N: server wall time, engine-batch wall time, their ratio (engine / server: 1.0 means the
server adds nothing), and median / p95 turn latency seen by the clients. For N = 1 the baseline is
that one session's dialogue alone (the lab's own per-turn overhead). With `--queue-row` the bench
also runs the 8-client load with the row cap at 2 (one session at a time: how the lab served
before the scheduler). Repetitions are interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from engine import Dialogue, load_model

MESSAGES = ["Is it ever right to break a promise? Answer in one sentence.", "Are you sure? Think again."]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_file: Path, max_rows: int):
    """`app.py` in a subprocess, as a researcher starts it; returns (url, process) once it answers."""
    import os
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, str(root / "app.py"), "--port", str(port), "--db", str(db_file), "--max-rows", str(max_rows)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the lab server exited while starting")
        try:
            urllib.request.urlopen(url, timeout=2)
            return url, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the lab server did not answer within 300 s")


def run_clients(url: str, n: int, turns: int, new_tokens: int) -> tuple[float, list[float], list[str]]:
    """N clients at once, each `turns` turns; (wall seconds, every turn's latency, session ids)."""
    from gradio_client import Client

    from lab.arena import OUTPUT_NAMES

    clients = [Client(url, verbose=False) for _ in range(n)]
    latencies: list[float] = []
    sids: list[str] = [""] * n
    errors: list[str] = []
    barrier = threading.Barrier(n + 1)
    lock = threading.Lock()

    def play(k: int):
        barrier.wait()
        for t in range(turns):
            t0 = time.perf_counter()
            out = dict(
                zip(
                    OUTPUT_NAMES,
                    clients[k].predict(
                        MESSAGES[t % len(MESSAGES)],
                        api_name="/send",
                        arm1_max_new_tokens=new_tokens,
                        arm2_max_new_tokens=new_tokens,
                    ),
                )
            )
            dt = time.perf_counter() - t0
            if f"Turn {t + 1} logged" not in out["status"]:
                with lock:
                    errors.append(out["status"])
            with lock:
                latencies.append(dt)
            if "`" in out["status"]:
                sids[k] = out["status"].split("`")[1]

    threads = [threading.Thread(target=play, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"a turn was not logged: {errors[0]}")
    for c in clients:
        c.close()
    return wall, latencies, sids


def engine_batch(lm, specs, system, n: int, turns: int, new_tokens: int) -> float:
    """The same 2N rows as one Dialogue: the engine's time for the whole load."""
    d = Dialogue(lm, list(specs) * n, system=system)
    start = time.perf_counter()
    for t in range(turns):
        d.send(MESSAGES[t % len(MESSAGES)], max_new_tokens=new_tokens)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", default="1,4,8,16")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--queue-row", action="store_true", help="also run 8 clients with the row cap at 2")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.sessions.split(",")]
    lm = load_model(verbose=False)
    from db import Store
    from experiments.record import session_specs

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    url, proc = start_server(tmp / "lab.db", args.max_rows)
    store = Store(f"sqlite:///{tmp / 'lab.db'}")
    queue_row = None
    try:
        # warm-up: one client, and learn the Arena's default arms and system prompt from its log
        _, _, sids = run_clients(url, 1, 1, args.new_tokens)
        session = store.get_session(sids[0])
        specs, system = session_specs(session), session["system_prompt"]
        engine_batch(lm, specs, system, 1, 1, args.new_tokens)
        rows = {n: {"server": [], "engine": [], "lat": []} for n in ns}
        for _ in range(args.reps):
            for n in ns:
                wall, lat, _ = run_clients(url, n, args.turns, args.new_tokens)
                rows[n]["server"].append(wall)
                rows[n]["lat"] += lat
                rows[n]["engine"].append(engine_batch(lm, specs, system, n, args.turns, args.new_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.queue_row:  # the same server with the row cap at one session's rows
        url, proc = start_server(tmp / "lab.db", len(specs))
        try:
            run_clients(url, 1, 1, args.new_tokens)
            wall, lat, _ = run_clients(url, 8, args.turns, args.new_tokens)
            queue_row = (wall, statistics.median(lat), pct(lat, 0.95))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    store.close()

    print(
        f"lab server vs one engine batch: embedded model, {len(specs)} arms per session "
        f"({', '.join(s.to_string() for s in specs)}), {args.turns} turns x {args.new_tokens} new tokens, greedy, "
        f"{args.reps} rep(s), medians"
    )
    print(
        f"{'sessions':>8} {'rows':>5} {'server s':>9} {'engine s':>9} {'ratio':>6} {'median turn s':>14} "
        f"{'p95 turn s':>11}"
    )
    single = None
    for n in ns:
        r = rows[n]
        server, engine = statistics.median(r["server"]), statistics.median(r["engine"])
        med, p95 = statistics.median(r["lat"]), pct(r["lat"], 0.95)
        if n == 1:
            single = med
        print(
            f"{n:>8} {n * len(specs):>5} {server:>9.2f} {engine:>9.2f} {engine / server:>6.2f} {med:>14.2f} "
            f"{p95:>11.2f}"
        )
    if single is not None:
        for n in ns:
            if n > 1:
                print(
                    f"p95 turn latency with {n} sessions / median single-session turn: "
                    f"{pct(rows[n]['lat'], 0.95) / single:.2f}x"
                )
    if queue_row is not None:
        print(
            f"8 sessions with the row cap at one session (the old one-at-a-time queue): server {queue_row[0]:.2f} s, "
            f"median turn {queue_row[1]:.2f} s, p95 {queue_row[2]:.2f} s"
        )


if __name__ == "__main__":
    main()
