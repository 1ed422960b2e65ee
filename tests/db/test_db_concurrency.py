"""Several writers at once must not lose a turn, and a writer killed mid-commit must
leave a sound file holding every turn it reported as committed."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from db import Store

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
MODEL = {"name": "tiny-llm"}


def test_concurrent_writers_lose_nothing(new_db):
    path = new_db("busy")
    st = Store(path)
    sid = st.create_session("lab", "stress", MODEL, [{"label": f"arm{i}", "spec": "x", "seed": i} for i in range(9)])
    other = Store(path)  # a second Store (its own engine and pool) on the same database
    errors = []

    def writer(store, arm, n=25):
        try:
            for k in range(n):
                store.log_turn(sid, arm, k, "assistant", f"arm {arm} turn {k}", [arm, k])
                if k % 5 == 0:
                    store.get_turns(sid, arm)  # readers interleaved with writers
        except Exception as e:  # collected: an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(st, arm)) for arm in range(8)]
    threads.append(threading.Thread(target=writer, args=(other, 8)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    turns = Store(path).get_turns(sid)
    assert len(turns) == 9 * 25
    assert {(t["arm_index"], t["turn_index"]) for t in turns} == {(a, k) for a in range(9) for k in range(25)}
    assert all(t["token_ids"] == [t["arm_index"], t["turn_index"]] for t in turns)


CHILD = """
import sys
from db import Store
st = Store(sys.argv[1])
sid, i = sys.argv[2], 0
while True:
    st.log_turn(sid, 0, i, "assistant", "x" * 4000, list(range(500)), gen_settings={"seed": i})
    print(i, flush=True)  # printed only after the commit returned
    i += 1
"""


def test_writer_killed_mid_write_leaves_sound_file(tmp_path):
    path = tmp_path / "killed.db"
    st = Store(path)
    sid = st.create_session("experiment", "kill me", MODEL, [{"label": "observer", "spec": "observer", "seed": 0}])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), sid],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(st.get_turns(sid)) < 30:  # visible from here while the child keeps writing
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "child wrote too slowly"
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    reported = [int(x) for x in out.split()]
    assert len(reported) >= 30

    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    stored = {t["turn_index"] for t in Store(path).get_turns(sid)}
    assert set(reported) <= stored
    assert stored == set(range(len(stored)))  # no holes: at most the in-flight turn is beyond the report
    assert len(stored) - len(reported) <= 1
    st.log_turn(sid, 0, len(stored), "assistant", "life goes on", [1])
