"""What every tab of the lab shares: one model, one store, one lock for the model.

Module globals are shared by all browser tabs; per-tab conversation state lives in gr.State.
The model is loaded once per process and used by one model-bound event at a time (MODEL_QUEUE),
which is what a CPU or a single GPU can serve without slowing every user down.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from db import Store
from engine import LoadedModel

MODEL_QUEUE = "model"  # the concurrency_id of every event that runs the model


@dataclass
class LabContext:
    store: Store
    lm: LoadedModel
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    db_url: str = ""
    captures_dir: str = ""  # where on-demand captures are cached next to the DB
