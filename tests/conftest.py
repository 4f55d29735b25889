"""Shared fixtures: tiny models and tokenizers built in memory, so unit tests stay fast."""

from __future__ import annotations

import os

import pytest
import torch

from glasslab.config import ModelConfig
from glasslab.model.gpt import GPT


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The measured peak FLOP/s and inductor's caches go to a directory of the test session, not the user's."""
    before = os.environ.get("GLASSLAB_CACHE_DIR")
    os.environ["GLASSLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("glasslab-cache"))
    yield
    if before is None:
        os.environ.pop("GLASSLAB_CACHE_DIR")
    else:
        os.environ["GLASSLAB_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP start-up and spin costs that dominate on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=32, block_size=32)


@pytest.fixture
def tiny_model(tiny_model_cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_model_cfg)
