"""Task environments by name: the built-ins, or your own class as `module:Class` (a subclass of
`glasslab.envs.base.Environment`, with an `Options` pydantic model if it takes settings)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pydantic import ValidationError

from glasslab.envs.arithmetic import Arithmetic
from glasslab.envs.base import Environment
from glasslab.envs.calculator import Calculator
from glasslab.envs.countdown import Countdown
from glasslab.errors import GlasslabError

ENVIRONMENTS: dict[str, type[Environment]] = {
    "arithmetic": Arithmetic,
    "countdown": Countdown,
    "calculator": Calculator,
}


def env_class(name: str) -> type[Environment]:
    """A built-in environment, or the class `module:Class` refers to."""
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    available = f"choose one of {', '.join(ENVIRONMENTS)}, or your own class as module:Class"
    module_name, sep, class_name = name.partition(":")
    if not sep:
        raise GlasslabError(f"unknown task environment '{name}': {available}")
    try:
        cls = getattr(import_module(module_name), class_name)
    except ImportError as e:
        msg = f"cannot import module '{module_name}' for environment '{name}' ({e}): check it is on PYTHONPATH"
        raise GlasslabError(msg) from None
    except AttributeError:
        raise GlasslabError(
            f"module '{module_name}' has no class '{class_name}': check the name after the ':'"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise GlasslabError(f"'{name}' is not a subclass of glasslab.envs.base.Environment: subclass it")
    return cls


def get_env(name: str, options: dict[str, Any] | None = None) -> Environment:
    """An environment with its options (from `cfg.envs.get(name, {})`) validated."""
    cls = env_class(name)
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = ", ".join(cls.Options.model_fields) or "none"
            raise GlasslabError(f"unknown option '{key}' for environment '{name}': valid options are {valid}") from None
        where = f"option '{key}'" if key else "options"
        raise GlasslabError(f"bad {where} for environment '{name}' ({e.get('input')!r}): {e['msg']}") from None
    return cls(opts)
