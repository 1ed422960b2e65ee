"""Bad input the step scheduler made possible, against the real lab server over HTTP: a tab that
floods /send, a tab closed mid-turn, more rows asked for than the row cap holds. Each gets one clear
line (or simply waits its turn), nothing logged is lost or doubled, and the server stays up.

One server per module with a row cap of 2 (one 2-arm session fills it), a fresh SQLite file; the
other battery (tests/test_bad_inputs.py) covers the endpoints' inputs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def capped(embedded, tmp_path_factory):
    from db import Store
    from tests.conftest import serve_lab

    db_file = tmp_path_factory.mktemp("capped") / "lab.db"
    store = Store(f"sqlite:///{db_file}")
    url, demo = serve_lab(store, embedded, max_rows=2)
    yield url, store
    demo.close()
    store.close()


def client(url):
    from gradio_client import Client

    # 60 s, not httpx's 5: on a loaded 2-core machine /cancel waits for the turn's next step and its write
    return Client(url, verbose=False, httpx_kwargs={"timeout": 60})


def status_of(result) -> str:
    from tests.lab.test_lab_api import outputs

    return outputs(result)["status"]


def turn_rows(store, sid) -> list[tuple]:
    return sorted((t["arm_index"], t["turn_index"], t["role"]) for t in store.get_turns(sid))


def lab_sessions(store) -> dict[str, dict]:
    return {s["id"]: s for s in store.list_sessions(kind="lab")}


def test_a_tab_flooding_send_runs_one_turn_at_a_time(capped, capfd):
    """Eight sends from one tab at once: the first message starts the session and runs; every send
    that arrives while a turn runs is refused in one line; no second session, no doubled row."""
    url, store = capped
    before = set(lab_sessions(store))
    c = client(url)  # one client = one browser tab (one session hash)
    jobs = [
        c.submit(f"Message {k}: say hi.", api_name="/send", arm1_max_new_tokens=12, arm2_max_new_tokens=12)
        for k in range(8)
    ]
    statuses = [status_of(j.result(timeout=300)) for j in jobs]
    ran = [s for s in statuses if "logged" in s]
    refused = [s for s in statuses if "logged" not in s]
    assert ran, statuses
    assert all(s.startswith("⚠ A turn is") and "running" in s and "\n" not in s.strip() for s in refused), refused
    new = set(lab_sessions(store)) - before
    assert len(new) == 1, statuses  # concurrent first messages did not start two sessions
    [sid] = new
    rows = turn_rows(store, sid)
    assert len(rows) == len(set(rows)) == 4 * len(ran)  # each turn that ran: 2 arms x (user, assistant), once
    assert "Traceback" not in capfd.readouterr().err
    out = status_of(c.predict("Still there?", api_name="/send"))  # the tab goes on
    assert f"Turn {len(ran) + 1} logged" in out, out


def test_a_tab_closed_mid_turn_keeps_what_was_generated(capped):
    """The client goes away while its turn streams: the turn ends at the next step, what was generated
    is logged as that turn, and the server serves the next tab at once."""
    url, store = capped
    before = set(lab_sessions(store))
    job = client(url).submit(
        "Tell me a long story about a lighthouse.", api_name="/send", arm1_max_new_tokens=200, arm2_max_new_tokens=200
    )
    deadline = time.time() + 120
    while len(job.outputs()) < 4 and time.time() < deadline:  # a few streamed steps
        time.sleep(0.05)
    assert len(job.outputs()) >= 4, "the turn never streamed"
    job.cancel()
    deadline = time.time() + 120
    while time.time() < deadline:  # logged once the scheduler has ended the turn
        new = set(lab_sessions(store)) - before
        if new and len(store.get_turns(next(iter(new)))) == 4:
            break
        time.sleep(0.2)
    [sid] = set(lab_sessions(store)) - before
    turns = store.get_turns(sid)
    assert turn_rows(store, sid) == [(0, 0, "assistant"), (0, 0, "user"), (1, 0, "assistant"), (1, 0, "user")]
    replies = [t for t in turns if t["role"] == "assistant"]
    assert all(0 < t["n_tokens"] < 200 for t in replies), [t["n_tokens"] for t in replies]  # cut short, kept
    t0 = time.time()
    assert "Turn 1 logged" in status_of(
        client(url).predict("Hi", api_name="/send", arm1_max_new_tokens=4, arm2_max_new_tokens=4)
    )
    assert time.time() - t0 < 60  # the abandoned turn's rows were freed, not left running to 200 tokens


def test_more_tabs_than_the_row_cap_wait_their_turn(capped):
    """Three tabs of 2 arms each against a cap of 2 rows: one runs, the others say they are queued
    (with how many are ahead) and then run; every turn is logged once."""
    url, store = capped
    before = set(lab_sessions(store))
    jobs = [
        client(url).submit(f"Name {k + 2} colours.", api_name="/send", arm1_max_new_tokens=12, arm2_max_new_tokens=12)
        for k in range(3)
    ]
    queued_lines: list[str] = []
    stop = threading.Event()

    def watch():  # the status each tab shows while it streams
        from tests.lab.test_lab_api import outputs

        while not stop.is_set():
            for j in jobs:
                for o in j.outputs():
                    s = outputs(o)["status"]
                    if "queued" in s.lower() and s not in queued_lines:
                        queued_lines.append(s)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        statuses = [status_of(j.result(timeout=300)) for j in jobs]
    finally:
        stop.set()
        watcher.join()
    assert all("Turn 1 logged" in s for s in statuses), statuses
    assert any("ahead" in s for s in queued_lines), queued_lines  # at least one tab was told it waits
    new = set(lab_sessions(store)) - before
    assert len(new) == 3
    for sid in new:
        rows = turn_rows(store, sid)
        assert len(rows) == len(set(rows)) == 4
