"""Offline controls with as many trained numbers as a trained mechanism, on the same data under the
same config: a soft prompt and a LoRA on the base model (peft). They tell "the mechanism learned
something" from "any P trained numbers on this data learn it".

README: "Matched controls for the trained wins" (studies/README.md), the table's last two columns.

    python -m studies.peft_controls configs/neural_persistent_tiny_cpu.yaml --soft-prompt 24
    python -m studies.peft_controls configs/palm_tiny_cpu.yaml --soft-prompt 358
    python -m studies.peft_controls configs/neural_persistent_tiny_cpu.yaml --lora-rank 4 --lora-layers 16,22,28
    python -m studies.peft_controls configs/palm_tiny_cpu.yaml --lora-rank 60 --lora-layers 20,24,28

A **soft prompt** (Lester et al. 2021) is P trained input embeddings placed before every sequence:
peft's prompt tuning (`PromptTuningConfig`, initialised from sampled vocabulary embeddings) on the
frozen base model; it trains P x hidden numbers (24 x 576 = 13,824 for the persistent tokens' 3
layers x 8 tokens x 576; 358 x 576 = 206,208 for the partial-attention branch). A **base LoRA** is
peft's LoRA (`LoraConfig`, B = 0 at the start, alpha = 2 x rank) on the query projection of the
given layers: rank r on `q_proj` (576 -> 576) trains 2 x 576 x r numbers per layer (rank 4 on 3
layers: 13,824; rank 60 on 3 layers: 207,360 against the branch's 206,208).

Everything else is the matched config's, read from the same YAML `python -m engine train` reads:
the data (train and held-out files, chat template, loss on the replies, max length), batches in the
same seeded order (`engine.train._loaders`), AdamW at the config's learning rate and weight decay,
its warm-up and schedule (`engine.train._optimizer`), gradient clipping, steps and evaluation
interval. The held-out number is the trainer's: summed next-token NLL over the held-out replies'
tokens / their count, on the real tokens only (the prompt's positions carry no label). The base
model's held-out loss is measured first through the same code, so the pipeline can be checked
against the trainer's (1.0036 on data/palm).

Neither is an arm of the lab: a soft prompt adds positions in front of the sequence, which protocol
v2 cannot add (studies/README.md, the neural memory's MAC paragraph), and a LoRA on the base changes
the model every arm shares. They are offline controls. Output: `<out>/adapter/` (peft adapter
folder, safetensors) and `<out>/result.json` (every held-out loss measured, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def held_out_loss(model, loader, prompt_tokens: int) -> float:
    """Loss per labelled token over `loader`: the trainer's held-out number, on the real tokens."""
    model.eval()
    nll_sum, n_sum = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            nll, n = batch_nll(model, batch, prompt_tokens)
            nll_sum, n_sum = nll_sum + float(nll), n_sum + int(n)
    model.train()
    return nll_sum / max(1, n_sum)


def batch_nll(model, batch, prompt_tokens: int):
    """(summed next-token NLL over the batch's labelled tokens, their count). The model's logits carry
    `prompt_tokens` extra positions in front (peft prepends the prompt); they are dropped."""
    out = model(input_ids=batch["ids"], attention_mask=batch["valid"].long())
    logits = out.logits[:, prompt_tokens:-1].float()
    target = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, (target != -100).sum()


def soft_prompt(tokens: int):
    """peft's config for a `tokens`-token soft prompt, and the positions it adds in front."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
    )
    return config, tokens


def base_lora(rank: int, layers: list[int], modules: list[str]):
    """peft's config for a rank-`rank` LoRA on `modules` of `layers` (B = 0: the base model at the start)."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=modules,
        layers_to_transform=layers,
    )
    return config, 0


def train_control(cfg, control, out_dir: Path, *, lm=None, progress: bool = True, log=print) -> dict:
    """Train a peft control (`control`: `soft_prompt(...)` or `base_lora(...)`) under the matched config
    `cfg` (a TrainConfig); returns the result (held-out loss of the base model, of the fresh control and
    at every evaluation)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from engine.model import load_model
    from engine.train import _loaders, _optimizer

    t = cfg.train
    set_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum)
    lm = lm or load_model(cfg.model, dtype=cfg.dtype, device=str(accelerator.device), verbose=False)
    base = lm.model
    base.requires_grad_(False)
    base.eval()
    loader, eval_loader, has_eval, _ = _loaders(cfg, lm.tokenizer)
    if not has_eval:
        raise ValueError("the matched config has no held-out rows (data.eval or data.eval_fraction)")
    base_loss = held_out_loss(base, eval_loader, 0)
    log(f"base model: held-out loss {base_loss:.4f}")

    peft_config, tokens = control
    kind = "soft prompt" if tokens else "base LoRA"
    model = get_peft_model(base, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in params)
    optimizer, scheduler = _optimizer(cfg, model, [])  # the trainer's AdamW and schedule, on the control's numbers
    model, optimizer, loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, loader, eval_loader, scheduler
    )
    history = [[0, held_out_loss(model, eval_loader, tokens)]]
    log(f"{kind} ({n_trained:,} numbers), step 0: held-out loss {history[0][1]:.4f}")
    step, started = 0, time.perf_counter()
    bar = tqdm(total=t.max_steps, desc=kind, disable=not progress, dynamic_ncols=True)
    model.train()
    while step < t.max_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                nll, n = batch_nll(model, batch, tokens)
                loss = nll / n.clamp_min(1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step % t.eval_every == 0 or step == t.max_steps:
                history.append([step, held_out_loss(model, eval_loader, tokens)])
                bar.write(f"step {step}: held-out loss {history[-1][1]:.4f}")
            if step >= t.max_steps:
                break
    bar.close()
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.unwrap_model(model).save_pretrained(str(out_dir / "adapter"))
    result = {
        "control": kind,
        "tokens": tokens,
        "trained_numbers": n_trained,
        "base_loss": base_loss,
        "history": history,
        "best_loss": min(loss for _, loss in history[1:]) if len(history) > 1 else None,
        "seconds": round(seconds, 1),
        "config": cfg.model_dump(mode="json"),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    log(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


def main(argv: list[str] | None = None) -> int:
    from engine.train import ConfigError, load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the matched mechanism's training config (YAML of python -m engine train)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--soft-prompt", type=int, metavar="P", help="a P-token soft prompt (P x hidden numbers)")
    kind.add_argument("--lora-rank", type=int, metavar="R", help="a rank-R LoRA on the base model")
    p.add_argument("--lora-layers", default=None, help="with --lora-rank: comma-separated layer indices")
    p.add_argument("--lora-modules", default="q_proj", help="with --lora-rank: comma-separated module names")
    p.add_argument("--out", default=None, help="output folder (default runs/peft_<control>_<config name>)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    size = args.soft_prompt if args.soft_prompt is not None else args.lora_rank
    if size < 1:
        print("error: --soft-prompt / --lora-rank must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.soft_prompt is not None:
        control, name = soft_prompt(args.soft_prompt), f"prompt{args.soft_prompt}"
    else:
        try:
            layers = [int(x) for x in args.lora_layers.split(",")] if args.lora_layers else None
        except ValueError:
            print(
                f"error: --lora-layers: not a comma-separated list of integers: {args.lora_layers!r}", file=sys.stderr
            )
            return 2
        modules = [m.strip() for m in args.lora_modules.split(",") if m.strip()]
        control, name = base_lora(args.lora_rank, layers, modules), f"lora{args.lora_rank}"
    out = Path(args.out or f"runs/peft_{name}_{Path(args.config).stem}")
    try:
        train_control(cfg, control, out, progress=not args.no_progress)
    except ValueError as e:  # peft: a module or layer the model does not have
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
