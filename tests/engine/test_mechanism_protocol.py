"""Protocol v2 beyond the conformance suite: weights files and provenance, quoted spec values,
test-time gradients, auxiliary losses, plugins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from engine import Dialogue, DialogueError, SpecError, parse_arm
from engine.hooks import BatchContext, MechanismHost, RowBinding
from engine.mechanisms import MECHANISMS, Mechanism, MechanismSettings, StepRow, register
from engine.spec import ArmSpec
from engine.weights import WeightsError, check_fits, read_header, save_weights, shared_weights


def vectors(lm, scale=1.0, layers=None):
    n, h = lm.model.config.num_hidden_layers, lm.model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    return {f"vector.{l}": torch.randn(h, generator=g) * scale for l in (layers or range(n))}


def write_toy(path, lm, layers, scale=1.0):
    settings = {"layers": layers, "init_scale": 1.0}
    return save_weights(
        path,
        vectors(lm, scale, layers),
        mechanism="vector_toy",
        settings=settings,
        model=lm.model,
        identity=lm.identity,
    )


# -- spec strings ----------------------------------------------------------------------------------
def test_quoted_values_are_literal_and_round_trip(tmp_path, tiny_llama):
    path = tmp_path / "a dir,x" / "toy=1.safetensors"
    write_toy(path, tiny_llama, [1, 2])
    spec = parse_arm(f'vector_toy:weights="{path}",linkage=0.5')
    assert spec.settings.weights == str(path)
    assert spec.settings.layers == [1, 2]  # the file's settings are the arm's defaults
    again = parse_arm(spec.to_string())
    assert again.settings == spec.settings
    assert parse_arm(f'vector_toy:weights="{path}",layers=2').settings.layers == [2]  # the spec wins
    with pytest.raises(SpecError, match="unbalanced double quote"):
        parse_arm('vector_toy:weights="oops,linkage=1')


def test_at_name_resolves_in_the_weights_folder(tmp_path, tiny_llama, monkeypatch):
    write_toy(tmp_path / "mine.safetensors", tiny_llama, [0])
    monkeypatch.setenv("LAB_WEIGHTS_DIR", str(tmp_path))
    assert parse_arm("vector_toy:weights=@mine").settings.layers == [0]


# -- weights files ---------------------------------------------------------------------------------
def test_weights_are_loaded_once_and_shared(tmp_path, tiny_llama):
    path = tmp_path / "toy.safetensors"
    write_toy(path, tiny_llama, [1, 3])
    spec = parse_arm(f'vector_toy:weights="{path}"')
    a = Dialogue(tiny_llama, [spec, spec])
    b = Dialogue(tiny_llama, [spec])
    mods = {id(x.mechanism.weights) for x in a.arms + b.arms}
    assert len(mods) == 1
    assert torch.equal(a.arms[0].mechanism.weights["3"], vectors(tiny_llama, layers=[1, 3])["vector.3"])
    assert not any(p.requires_grad for p in a.arms[0].mechanism.weights.parameters())
    a.send("Hello", max_new_tokens=3)


def test_other_models_file_is_refused(tmp_path, tiny_llama, embedded):
    path = tmp_path / "tiny.safetensors"
    write_toy(path, tiny_llama, [1])
    wf = read_header(path)
    with pytest.raises(WeightsError, match="made for another model: hidden size 64"):
        check_fits(wf, "vector_toy", embedded.model, embedded.identity)
    with pytest.raises(DialogueError, match="another model"):
        Dialogue(embedded, [parse_arm(f'vector_toy:weights="{path}"')])


def test_same_shape_other_weights_hash_is_refused(tmp_path, tokenizer):
    from conftest import make_tiny

    a, b = make_tiny("llama", tokenizer, seed=0), make_tiny("llama", tokenizer, seed=1)
    path = tmp_path / "a.safetensors"
    write_toy(path, a, [1])
    with pytest.raises(WeightsError, match="was made for model 'tiny-llama'"):
        shared_weights(
            MECHANISMS["vector_toy"], parse_arm(f'vector_toy:weights="{path}"').settings, b.model, b.identity
        )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign", "missing"])
def test_damaged_files_are_refused_with_one_line(tmp_path, tiny_llama, damage):
    path = tmp_path / "toy.safetensors"
    write_toy(path, tiny_llama, [1])
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 40])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xffnot a safetensors file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(path))
    else:
        path.unlink()
    with pytest.raises(SpecError) as e:
        parse_arm(f'vector_toy:weights="{path}"')
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_provenance_records_the_hash_and_replay_refuses_a_changed_file(tmp_path, tiny_llama):
    path = tmp_path / "toy.safetensors"
    sha = write_toy(path, tiny_llama, [1])
    d = parse_arm(f'vector_toy:weights="{path}"').to_dict()
    assert d["weights_sha256"] == sha
    assert ArmSpec.from_dict(d).settings.weights == str(path)
    write_toy(path, tiny_llama, [1], scale=2.0)
    with pytest.raises(SpecError, match="has changed since this arm was run"):
        ArmSpec.from_dict(d)
    path.unlink()
    with pytest.raises(SpecError, match="is missing"):
        ArmSpec.from_dict(d)


def test_cli_refuses_other_models_file_with_one_line(tmp_path, tiny_llama):
    path = tmp_path / "tiny.safetensors"
    write_toy(path, tiny_llama, [1])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "generate",
            "--prompt",
            "Hi",
            "--arm",
            "observer",
            "--arm",
            f'vector_toy:weights="{path}"',
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "another model" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_plugins_appear_in_the_cli():
    r = subprocess.run(
        [sys.executable, "-m", "engine", "mechanisms"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    names = [l for l in r.stdout.splitlines() if l and not l.startswith(" ")]
    assert {"continuity", "mask_toy", "vector_toy"} <= set(names)


def test_a_broken_plugin_is_one_clear_error():
    env = {**os.environ, "LAB_PLUGINS": "no_such_module_xyz"}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "mechanisms"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and "continuity" in r.stdout
    assert r.stderr.strip().startswith("warning: LAB_PLUGINS: cannot import 'no_such_module_xyz'")
    assert len(r.stderr.strip().splitlines()) == 1


# -- test-time gradients, auxiliary losses ---------------------------------------------------------
class _GradSettings(MechanismSettings):
    pass


class _GradToy(Mechanism):
    """Takes a real autograd step inside its forward: impossible under inference_mode."""

    name = "grad_toy_test"
    Settings = _GradSettings
    needs_grad = True

    def forward(self, call):
        with torch.enable_grad():
            w = torch.zeros(call.x_hat.shape[-1], requires_grad=True)
            loss = ((call.x_hat.detach() @ w) - 1.0).pow(2).mean()
            (grad,) = torch.autograd.grad(loss, w)
        self.call_counts[call.layer] += 1
        return (-grad).expand_as(call.attn_out)


def test_needs_grad_rows_can_take_gradient_steps(tiny_llama):
    register(_GradToy)
    try:
        d = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("grad_toy_test:linkage=1,layers=1")])
        replies = d.send("Hello there", max_new_tokens=4)
        assert d.arms[1].mechanism.call_counts[1] > 0
        # rows without grad-needing arms stay in inference mode, and the observer row is untouched
        base = Dialogue(tiny_llama, [parse_arm("observer"), parse_arm("observer")]).send(
            "Hello there", max_new_tokens=4
        )
        assert replies[0].token_ids == base[0].token_ids
    finally:
        del MECHANISMS["grad_toy_test"]


def test_auxiliary_losses_reach_the_caller_and_backpropagate(tiny_llama):
    model = tiny_llama.model
    spec = parse_arm("vector_toy:linkage=1,layers=1/2")
    cls = MECHANISMS["vector_toy"]
    params = cls.build_weights(spec.settings, model, None)  # trainable, not the shared frozen copy
    mech = cls(spec.settings, model, params)
    ids = torch.tensor([[10, 11, 12, 13]])
    row = StepRow(torch.arange(4), torch.zeros(4, dtype=torch.long), ids[0], 0, False)
    ctx = BatchContext([RowBinding(0, mech, torch.ones(4, dtype=torch.bool), row)])
    with MechanismHost.of(model).use(ctx):
        out = model(input_ids=ids)
    assert set(ctx.aux[0]) == {"norm.1", "norm.2"}
    loss = out.logits.logsumexp(-1).mean() + sum(ctx.aux[0].values())
    loss.backward()
    assert params["1"].grad is not None and params["1"].grad.abs().sum() > 0
