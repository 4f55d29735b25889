"""The checks of a stage's user inputs, run by the commands before they create (or overwrite) a run directory,
so that a command failing on its input leaves nothing behind and the same name can be used again.

What needs the stage's own results (an SFT file's token lengths when the run trains its tokenizer first) is
checked again by the stage itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glasslab.chat.conversations import load_conversations, read_conversations
from glasslab.config import Config
from glasslab.data.tokenizer import Tokenizer, check_vocab_size
from glasslab.envs import get_env
from glasslab.objectives.rollouts import check_reward_weights
from glasslab.stages.common import check_device, documents
from glasslab.stages.rl import retention_envs, rl_env


@dataclass
class Inputs:
    """What the checks loaded, for the stages to reuse instead of loading it again."""

    docs: list[str] | None = None  # the pretraining documents, when pretraining is among the stages


def check_inputs(cfg: Config, stages: list[str], tokenizer: Path | None = None) -> Inputs:
    """Raise a GlasslabError for the first bad input of `stages`: device, vocabulary size and data source, SFT tasks and file, RL
    environments and reward weights. `tokenizer`: the tokenizer the run will use, when it exists already (then an
    SFT file's conversations are also checked to fit the context)."""
    check_device(cfg.system)
    inputs = Inputs()
    if "pretrain" in stages:
        check_vocab_size(cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
        inputs.docs = documents(cfg)
    if "sft" in stages:
        for task in cfg.sft.tasks:
            get_env(task, cfg.envs.get(task, {}))
        if cfg.sft.data and tokenizer is not None:
            load_conversations(Path(cfg.sft.data), Tokenizer.load(tokenizer), cfg.model.block_size + 1)
        elif cfg.sft.data:
            read_conversations(Path(cfg.sft.data))
        if cfg.sft.replay and inputs.docs is None:
            documents(cfg)
    if "rl" in stages:
        check_reward_weights(rl_env(cfg), cfg.rl.reward_weights)
        retention_envs(cfg)
    return inputs
