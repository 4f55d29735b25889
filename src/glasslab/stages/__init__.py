"""Stage scripts: each wires data, model and an objective into the one training loop.

Every stage has the signature `stage(cfg, run, *, init=None, hooks=(), progress=None)`, where `init` is a
checkpoint directory whose weights start the stage (None: the run's own previous stage, or scratch).
"""

from collections.abc import Callable
from importlib import import_module

STAGES = {
    "pretrain": "glasslab.stages.pretrain:pretrain",
    "sft": "glasslab.stages.sft:sft",
    "rl": "glasslab.stages.rl:rl",
}


def get_stage(name: str) -> Callable:
    module, fn = STAGES[name].split(":")
    return getattr(import_module(module), fn)
