"""Fixtures for the adapter tests: tiny seeded Mixtral and Mistral models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from .helpers import tiny_mistral_config, tiny_mixtral_config


@pytest.fixture
def mixtral_config() -> MixtralConfig:
    return tiny_mixtral_config()


@pytest.fixture
def tiny_mixtral(mixtral_config: MixtralConfig) -> nn.Module:
    """A seeded float32 stock ``MixtralForCausalLM`` (2 layers, hidden 64, 4 experts)."""
    torch.manual_seed(0)
    return MixtralForCausalLM(mixtral_config).eval()


@pytest.fixture
def tiny_mistral() -> nn.Module:
    """A seeded float32 dense ``MistralForCausalLM``."""
    torch.manual_seed(0)
    return MistralForCausalLM(tiny_mistral_config()).eval()


@pytest.fixture
def fresh_seed() -> int:
    """A new seed per run (fresh random inputs), printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed: {seed}")
    return seed
