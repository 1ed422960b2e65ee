"""What every tab of the lab shares: one model, one store, one step scheduler for the model.

What is shared by all browser tabs lives here (one context per lab process); per-tab conversation
state lives in gr.State.
The model is loaded once per process and run by one thread, the step scheduler
(engine/scheduler.py): every tab's turns, and experiment runs started here, are batched into its
forward passes, so several researchers stream at once. Work that needs the whole model (Inspect's
captures) holds `model_lock` — the model between two steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from db import Store
from engine import LoadedModel
from engine.scheduler import ModelLease, StepScheduler, scheduler_from_env

ARENA_QUEUE = "arena"  # Arena turns: as many at once as the scheduler's row cap holds
INSPECT_QUEUE = "inspect"  # captures hold the model between steps: one at a time
RUN_QUEUE = "experiment-run"  # one experiment run at a time (its dialogues join the scheduler)


@dataclass
class ActiveRun:
    """The experiment run in progress in this lab (one model: one run at a time) and the browser tab that
    started it: only that tab stops it; other tabs watch it in the runs table."""

    event: threading.Event | None = None  # set by Stop: the run stops at its next step
    experiment_id: str | None = None
    owner: str | None = None  # the starting tab's token
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def busy(self) -> bool:
        with self.lock:
            return self.event is not None


@dataclass
class LabContext:
    store: Store
    lm: LoadedModel
    db_url: str = ""
    captures_dir: str = ""  # where on-demand captures are cached next to the DB
    max_rows: int | None = None  # the scheduler's row cap (None: $LAB_MAX_ROWS, else from free memory)
    scheduler: StepScheduler | None = field(default=None, repr=False)
    active_run: ActiveRun = field(default_factory=ActiveRun, repr=False)  # the Experiments tab's run

    def __post_init__(self):
        if self.scheduler is None and self.lm is not None:  # (a tab built without a model: tests)
            self.scheduler = scheduler_from_env(self.lm, self.max_rows)

    @property
    def model_lock(self) -> ModelLease:
        """The model to one caller between two scheduler steps (`with ctx.model_lock: ...`)."""
        return self.scheduler.lease
