"""How tests/data/lab-v1.db was made: run at commit 30abd5a (schema version 1, the hand-written
migration list, before Alembic), `python tests/data/make_lab_v1.py tests/data/lab-v1.db`.
Kept so the file's content is known; with today's code it would make an Alembic-managed file."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import Store  # noqa: E402
from test_db import fill  # noqa: E402

store = Store(sys.argv[1])
eid, sid, ids = fill(store, n_turns=3)               # an experiment session with one of everything
lab = store.create_session("lab", "free chat ü", {"name": "tiny-llm"},
                           [{"label": "observer", "spec": "observer", "settings": {}, "seed": 1}])
store.log_turn(lab, 0, 0, "user", "Is the sky green?", [5, 6])
store.log_turn(lab, 0, 0, "assistant", "No.", [7], finish_reason="eos")
store.update_experiment(eid, status="finished")
store.close()
