"""Stage scripts: each wires data, model and an objective into the one training loop.

Every stage has the signature `stage(cfg, run, *, init=None, hooks=(), progress=None)`, where `init` is a
checkpoint directory whose weights start the stage (None: the run's own previous stage, or scratch). Stage
`<name>` (a name in glasslab.track.layout.PIPELINE) is the function `<name>` of module `glasslab.stages.<name>`.
"""

from collections.abc import Callable
from importlib import import_module

from glasslab.track.layout import PIPELINE


def get_stage(name: str) -> Callable:
    if name not in PIPELINE:
        raise ValueError(f"stage must be one of {PIPELINE}, got {name!r}")
    return getattr(import_module(f"glasslab.stages.{name}"), name)
