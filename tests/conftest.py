"""Shared fixtures: tiny random Llama / Qwen2 / Mistral models and the real embedded model.

The tiny models borrow the embedded model's tokenizer (and its chat template), so every engine
path (templates, roles, multi-turn) runs on them exactly as on a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # importable: `make setup` installs the project (pip install -e .)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A mechanism defined only in the tests joins the engine, the CLI, the lab and the conformance suite
# the way any outside mechanism would: through $LAB_PLUGINS (subprocesses inherit it).
os.environ["LAB_PLUGINS"] = ",".join(filter(None, [os.environ.get("LAB_PLUGINS"), "tests.toy_mechanism"]))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny(arch: str, tokenizer, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from engine.model import LoadedModel, ModelIdentity

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common)).eval()
    model.requires_grad_(False)
    ident = ModelIdentity(
        name=f"tiny-{arch}",
        source="random",
        weights_hash=f"random-{seed}",
        dtype="float32",
        quantization=None,
        device="cpu",
        n_layers=4,
        architecture=cls[1].__name__,
    )
    return LoadedModel(model, tokenizer, ident, 0.0)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (use with `pytestmark = pytest.mark.usefixtures("one_thread")`): on a
    shared 2-core machine two threads contend and small training steps run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedded():
    from engine.model import load_model

    return load_model(verbose=False)


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded.tokenizer


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny(request, tokenizer):
    return make_tiny(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return make_tiny("llama", tokenizer)


# -- the real lab server and Debian's Chromium, for the API and browser tests ---------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
# Outside CI a missing browser skips (run `make browser`); in CI it must be there, so the tests fail.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK) and not os.environ.get("CI"), reason="needs Debian's chromium (make browser)"
    ),
]


@pytest.fixture()
def page():
    """A Chromium page (1400x1000, downloads accepted, 60 s default timeout). With $LAB_SCREENSHOTS set,
    the page as the test left it is saved there as <test name>.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        yield pg
        if os.environ.get("LAB_SCREENSHOTS"):
            name = os.environ.get("PYTEST_CURRENT_TEST", "browser").split("::")[-1].split(" ")[0]
            pg.screenshot(path=os.path.join(os.environ["LAB_SCREENSHOTS"], f"{name}.png"), full_page=True)
        context.close()
        browser.close()


def limit_new_tokens(page, n: int, panes: int = 2) -> None:
    """Open each pane's settings on the Arena and set its token limit to `n` (short turns on a CPU)."""
    from playwright.sync_api import expect

    settings = page.get_by_text("Arm settings (click to change)")
    expect(settings.nth(panes - 1)).to_be_visible(timeout=60_000)  # the first render takes ~4-6 s on a busy CPU
    for i in range(panes):
        settings.nth(i).click()
        box = page.get_by_label("Max new tokens").nth(i)
        box.fill(str(n))
        box.press("Tab")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_lab(store, lm, **ctx_fields):
    """Start the real lab app in-process on a free port; returns (url, demo)."""
    from lab.app import launch
    from lab.context import LabContext

    port = free_port()
    demo = launch(
        LabContext(store=store, lm=lm, db_url=store.name, **ctx_fields),
        "127.0.0.1",
        port,
        prevent_thread_lock=True,
        quiet=True,
    )
    return f"http://127.0.0.1:{port}/", demo


@pytest.fixture(scope="module")
def server(embedded, tmp_path_factory):
    """The real lab on a free port with a fresh SQLite file, one per test module: (url, db_file)."""
    from db import Store

    db_file = tmp_path_factory.mktemp("lab") / "lab.db"
    store = Store(f"sqlite:///{db_file}")
    url, demo = serve_lab(store, embedded)
    yield url, db_file
    demo.close()
    store.close()


# -- the database backends: real SQLite files and a real PostgreSQL server -----------------------
# Outside CI a missing PostgreSQL skips (run `make postgres`); in CI it must be there, so the tests fail.
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL server for the whole run (tests/pg_server.py)."""
    from tests.pg_server import PgServer, pg_bin

    bin_dir = pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's postgresql under /usr/lib/postgresql/*/bin (make postgres)")
        pytest.skip("needs Debian's postgresql under /usr/lib/postgresql/*/bin (make postgres)")
    server = PgServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def new_db(backend, tmp_path, request):
    """new_db(name) -> a fresh, empty database of this test's backend: a SQLite file path in
    tmp_path, or a new database on the PostgreSQL server (dropped after the test)."""
    if backend == "sqlite":
        yield lambda name="lab": tmp_path / f"{name}.db"
        return
    server = request.getfixturevalue("pg_server")
    made = []

    def make(name="lab"):
        made.append(f"t{len(server.databases)}_{name}"[:60])
        server.databases.append(made[-1])
        return server.create_database(made[-1])

    yield make
    for name in made:
        server.drop_database(name)


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray instance for every Ray test (2 CPUs, 80 MiB object store, no auth token)."""
    from experiments.distributed import start_ray

    ray, started = start_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
