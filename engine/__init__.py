"""The engine: model loading, arms, batched multi-arm generation, mechanisms, probes.

Usable from a notebook on its own; it knows nothing about the database or the web UI.

    from engine import load_model, parse_arm, Dialogue
    lm = load_model()                       # the embedded SmolLM2-135M-Instruct
    d = Dialogue(lm, [parse_arm("observer"), parse_arm("continuity:linkage=1")])
    for r in d.send("Is it ever right to lie?"):
        print(r.text)
"""

import logging

# bitsandbytes (imported by peft) offers an optional AVX512-BF16 4-bit kernel fetched from a model
# hub at run time; the lab never downloads, so its built-in kernel runs and that offer stays quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .dialogue import ArmReply, Dialogue, DialogueError, StreamEvent
from .mechanisms import MECHANISMS, ReadTrace, load_plugins, register
from .model import LoadedModel, ModelIdentity, ModelLoadError, load_model
from .spec import ArmSpec, SamplingSettings, SpecError, parse_arm
from .weights import WeightsError

load_plugins()  # mechanisms kept outside the package register themselves ($LAB_PLUGINS)

__all__ = [
    "ArmReply",
    "ArmSpec",
    "Dialogue",
    "DialogueError",
    "LoadedModel",
    "MECHANISMS",
    "ModelIdentity",
    "ModelLoadError",
    "ReadTrace",
    "SamplingSettings",
    "SpecError",
    "StreamEvent",
    "WeightsError",
    "load_model",
    "load_plugins",
    "parse_arm",
    "register",
]
