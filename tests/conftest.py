"""Shared fixtures: tiny models and tokenizers built in memory, so unit tests stay fast."""

from __future__ import annotations

import pytest
import torch

from glasslab.config import ModelConfig
from glasslab.model.gpt import GPT


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
