"""Running a protocol over Ray actors: `python -m experiments run ... --ray [ADDRESS]`.

The run is the single-process runner's (experiments/runner.py) spread out: one experiment record,
one session per (item, seed) dialogue, all arms of a dialogue batched in one `Dialogue`, resume and
Ctrl-C as there. What changes is where dialogues are played:

- Each actor loads the model once (`num_gpus=1` where the cluster has GPUs, else `num_cpus`) and
  plays whole dialogues: it returns the rows (`record.turn_rows`) and scores of one dialogue.
- Only the driver writes, one transaction per dialogue (`Store.log_dialogue`): a dialogue is in
  the database whole or not at all, so "complete last" holds by construction.
- Exactly once: Ray's delivery is at-least-once and `ActorPool` does not resubmit the work of a
  dead actor, so the driver does: a dialogue whose actor died is handed to a fresh actor, and a
  result that arrives twice is absorbed by `log_dialogue` (and the unique (experiment, item, seed)
  key in the database), never written twice.
- Same seeds, same tokens: an actor runs the plain runner's own functions on the same model.

Without an address a small local Ray instance is started for the run (object store capped,
no dashboard, `RAY_AUTH_MODE=disabled` unless set) and shut down after it; a running Ray (e.g. a
test's shared cluster, or `ray.init` in a notebook) is used as it is. On a cluster, every node
needs this repository and its environment at the same path (the actors import `engine` and
`experiments` from the driver's PYTHONPATH) and the model where `--model` says.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

from db import Store
from engine import ArmSpec
from experiments.protocol import Protocol
from experiments.runner import (
    ProgressFn,
    RunConfig,
    RunStatus,
    complete_meta,
    completed_keys,
    dialogue_plan,
    dialogue_title,
    make_config,
    open_run,
)

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE_BYTES = 80 << 20  # a local instance's object store: results are a few kB per dialogue
_ENV_FOR_ACTORS = ("LAB_PLUGINS", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "LAB_MODEL")


class DialogueWorker:
    """A Ray actor: one loaded model, plays whole dialogues and returns their rows (writes nothing)."""

    def __init__(self, model: Optional[str], dtype: Optional[str], threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        from engine import ModelLoadError, load_model

        self.lm, self.error = None, None
        try:
            self.lm = load_model(model, dtype=dtype, verbose=False)
        except ModelLoadError as e:  # said by describe(), in one line, instead of a dead actor's traceback
            self.error = str(e)

    def describe(self) -> dict:
        if self.lm is None:
            return {"pid": os.getpid(), "error": self.error}
        return {"pid": os.getpid(), "model": self.lm.identity.to_dict(), "n_layers": self.lm.config.num_hidden_layers}

    def peak_rss_mib(self) -> float:
        """This actor's peak resident memory (the model, its caches, torch): what a node must hold."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def play(self, config: RunConfig, item_index: int, item_key: str, seed: int, scorer_options: dict) -> dict:
        from experiments.record import session_fields, turn_rows
        from experiments.runner import play_dialogue, score_turns, start_dialogue

        d, meta = start_dialogue(self.lm, config, item_index, seed)
        session = session_fields(self.lm, d, meta)
        rows = []
        turns = play_dialogue(
            d, config, item_index, on_turn=lambda user, replies: rows.extend(turn_rows(d, user, replies))
        )
        scores = score_turns(config, item_index, turns, d.n_arms, scorer_options)
        score_rows = [
            {
                "arm_index": arm,
                "turn_index": k,
                "scorer": scorer,
                "label": t["label"],
                "value": t["value"],
                "data": t["data"],
            }
            for arm, by in scores.items()
            for scorer, result in by.items()
            for k, t in enumerate(result.turns)
        ]
        return {
            "item_key": item_key,
            "seed": seed,
            "session": {**session, "meta": complete_meta(session["meta"], scores)},
            "turns": rows,
            "scores": score_rows,
            "pid": os.getpid(),
        }


def _ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance needs no token (Ray writes one otherwise)
    import ray

    return ray


class RayUnavailable(RuntimeError):
    """No Ray cluster answers at the address given (said in one line, before Ray retries for minutes)."""


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise RayUnavailable unless something accepts a TCP connection at a `host:port` or
    `ray://host:port` address. Ray itself waits on a dead address for minutes, printing warnings;
    "auto" is left to Ray, which fails at once when no local cluster runs."""
    import socket

    target = address.removeprefix("ray://")
    if address == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        raise RayUnavailable(
            f"--ray {address}: the port {port!r} is not a number (use HOST:PORT, ray://HOST:PORT or auto)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailable(
            f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); "
            "start one with `ray start --head` or leave the address out for a local instance"
        ) from None


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Connect to `address`, or start a small local instance; returns (ray, started_here)."""
    if address:
        probe_address(address)
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    env = {k: os.environ[k] for k in _ENV_FOR_ACTORS if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    kwargs = dict(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:  # "auto" with no cluster running, or a port that is not Ray's
            raise RayUnavailable(f"--ray {address}: {str(e).splitlines()[0]}") from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES, **kwargs)
    return ray, True


class _Actors:
    """The run's actors, replaced when one dies."""

    def __init__(self, ray, model, dtype, n, threads):
        self.ray, self.model, self.dtype, self.threads = ray, model, dtype, threads
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": threads}
        self.cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(DialogueWorker)
        self.n = n or (int(gpus) if gpus >= 1 else max(1, int(ray.cluster_resources().get("CPU", 1)) // threads))
        self.live = [self.new() for _ in range(self.n)]
        self.started = 0

    def new(self):
        return self.cls.remote(self.model, self.dtype, self.threads)

    def describe(self) -> list[dict]:
        return self.ray.get([a.describe.remote() for a in self.live])

    def replace(self, dead):
        self.live[self.live.index(dead)] = fresh = self.new()
        return fresh

    def kill_all(self):
        for a in self.live:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


def run_protocol_ray(
    store: Store,
    protocol: Protocol | str,
    specs: Sequence[str | ArmSpec],
    seeds: int = 1,
    items: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    experiment_id: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    stop_event: Optional[threading.Event] = None,
    name: Optional[str] = None,
    scorer_options: Optional[dict[str, dict]] = None,
    window: Optional[int] = None,
    *,
    model: Optional[str] = None,
    dtype: Optional[str] = None,
    address: Optional[str] = None,
    actors: Optional[int] = None,
    threads_per_actor: int = 1,
) -> str:
    """`run_protocol` with the dialogues played by Ray actors (see the module doc); returns the
    experiment id. `model`/`dtype` are what each actor loads (load_model's arguments); `actors`
    defaults to one per GPU, else one per `threads_per_actor` CPUs. progress, stop_event, the
    interrupted/failed statuses and resume behave as in run_protocol; progress info carries the
    pid of the actor that played each dialogue."""
    config = make_config(protocol, specs, seeds, items, max_new_tokens, window)
    ray, started_here = start_ray(address)
    pool = None
    try:
        from ray.exceptions import RayActorError, RayTaskError

        pool = _Actors(ray, model, dtype, actors, threads_per_actor)
        info = pool.describe()[0]
        if info.get("error"):
            from engine import ModelLoadError

            raise ModelLoadError(info["error"])
        experiment_id = open_run(store, config, info["model"], info["n_layers"], experiment_id, name)
        with RunStatus(store, experiment_id) as status:
            plan = dialogue_plan(config)
            done_keys = completed_keys(store, experiment_id)
            todo = deque((i, key, s) for i, key, s in plan if (key, s) not in done_keys)
            done, total = len(plan) - len(todo), len(plan)
            if progress:
                progress(done, total, {"event": "start", "experiment_id": experiment_id})
            config_ref = ray.put(config)
            options = scorer_options or {}
            pending: dict = {}  # object ref -> (actor, (item_index, item_key, seed))

            def submit(actor):
                if todo:
                    job = todo.popleft()
                    pending[actor.play.remote(config_ref, *job, options)] = (actor, job)

            for a in pool.live:
                submit(a)
            while pending:
                if stop_event is not None and stop_event.is_set():
                    status.value = "interrupted"  # in-flight dialogues are not written: a resume plays them
                    return experiment_id
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    actor, job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayActorError:  # the actor died (killed, out of memory, node lost): redo elsewhere
                        todo.appendleft(job)
                        submit(pool.replace(actor))
                        continue
                    except RayTaskError as e:  # the dialogue itself failed: as in the plain runner, the run fails
                        raise (e.cause if isinstance(e.cause, Exception) else e) from None
                    submit(actor)  # keep the actor busy while the driver writes
                    key = (result["item_key"], result["seed"])
                    if key in done_keys:
                        continue  # a second delivery of a written dialogue
                    s = result["session"]
                    sid, _written = store.log_dialogue(
                        experiment_id,
                        result["item_key"],
                        result["seed"],
                        title=dialogue_title(config.protocol, result["item_key"], result["seed"]),
                        model=s["model"],
                        arms=s["arms"],
                        system_prompt=s["system_prompt"],
                        meta=s["meta"],
                        turns=result["turns"],
                        scores=result["scores"],
                    )
                    done_keys.add(key)
                    done += 1
                    if progress:
                        progress(
                            done,
                            total,
                            {
                                "event": "done",
                                "experiment_id": experiment_id,
                                "item": key[0],
                                "seed": key[1],
                                "session_id": sid,
                                "actor_pid": result["pid"],
                            },
                        )
            status.value = "finished"
        return experiment_id
    finally:
        if pool is not None:
            pool.kill_all()
        if started_here:
            ray.shutdown()


if __name__ == "__main__":  # pragma: no cover - python -m experiments run ... --ray is the way in
    sys.exit("use: python -m experiments run PROTOCOL --arm ... --ray [ADDRESS]")
