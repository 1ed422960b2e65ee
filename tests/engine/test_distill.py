"""`python -m engine distill`: slots are the host layer's x̂ of the document, methods, variants, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.dialogue import Dialogue
from engine.distill import DistillError, distill
from engine.spec import parse_arm
from engine.weights import load_tensors, read_header
from tests.conftest import ROOT

DOC = (
    "Kestlemere is a town of glass mills. Velmira Oskant lives there and works as a shipwright. "
    "Orsik Thrume lives in Sallowfen and makes rope. The river Vantry runs between the two towns."
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_slots_are_the_layers_normed_inputs(tiny_llama, tmp_path):
    out = tmp_path / "d.safetensors"
    r = distill(tiny_llama, DOC, "memory_bank:layers=1/3,chapters=3,top_k=1", out=out)
    ids = tiny_llama.tokenizer(DOC, add_special_tokens=False)["input_ids"]
    assert r["tokens"] == len(ids) and r["banks"] == 2 and r["slots"] == 3 * -(-len(ids) // 3)
    with torch.no_grad():
        hs = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    t = load_tensors(read_header(out))
    per = r["slots"] // 3
    for b, layer in enumerate([1, 3]):
        x_hat = tiny_llama.model.model.layers[layer].input_layernorm(hs[layer])[0]
        slots, mask = t[f"bank.{b}.slots"], t[f"bank.{b}.mask"]
        assert torch.allclose(slots[mask], x_hat, atol=1e-5)
        assert int(mask.sum()) == len(ids) and torch.equal(slots[per : per + 2], x_hat[per : per + 2])
    arm = parse_arm(f'memory_bank:linkage=1,weights="{out}"')
    assert arm.settings.sharing == "per_layer" and arm.settings.chapters == 3
    d = Dialogue(tiny_llama, [arm], record_traces=True)
    d.send("Where does Velmira live?", max_new_tokens=2)
    trace = d.arms[0].mechanism.traces[-1]
    assert trace.slot_keys[0].startswith("chapter 0 / '") and "@0" in trace.slot_keys[0]
    assert abs(trace.weights.sum() - 1) < 1e-4 and "router_entropy" in trace.scalars


@pytest.mark.parametrize(
    "arm,method",
    [
        ("memory_bank:layers=2,slots=8,chapters=2", "chunks"),
        ("memory_bank:layers=2,slots=8,chapters=2", "kmeans"),
        ("memory_bank:layers=2,variant=factorized,rank=64", "tokens"),
        ("memory_bank:layers=2,variant=reduced,rank=8,chapters=2", "tokens"),
    ],
)
def test_methods_and_variants_load_and_change_output(tiny_llama, tmp_path, arm, method):
    out = tmp_path / "m.safetensors"
    r = distill(tiny_llama, DOC, arm, method=method, out=out)
    t = load_tensors(read_header(out))
    if "factorized" in arm:  # rank 64 = the hidden size: the SVD reproduces the slots exactly
        ids = tiny_llama.tokenizer(DOC, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        x_hat = tiny_llama.model.model.layers[2].input_layernorm(hs[2])[0]
        assert torch.allclose((t["bank.0.a"] @ t["bank.0.b"].T)[: len(ids)], x_hat, atol=1e-4)
    else:
        assert r["slots"] == (8 if method != "tokens" else r["slots"])
    spec = f'memory_bank:linkage=1,weights="{out}"'
    plain = Dialogue(tiny_llama, [parse_arm("observer")])._forward([[5, 6, 7, 8]], [[1, 1, 1, 1]], 0, 0)
    with_bank = Dialogue(tiny_llama, [parse_arm(spec)])._forward([[5, 6, 7, 8]], [[1, 1, 1, 1]], 0, 0)
    assert (plain - with_bank).abs().max() > 1e-4


def test_refusals(tiny_llama, tmp_path):
    with pytest.raises(DistillError, match="too few for 64 slots"):
        distill(tiny_llama, DOC, "memory_bank:slots=64,chapters=2,layers=1", method="chunks")
    with pytest.raises(DistillError, match="memory_bank weights"):
        distill(tiny_llama, DOC, "observer")
    with pytest.raises(DistillError, match="empty"):
        distill(tiny_llama, "", "memory_bank:layers=1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "distill",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.strip() == f"error: document {tmp_path}/none.txt does not exist"
