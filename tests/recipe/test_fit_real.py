"""Recipe.fit on the real stack: random tiny Mixtral, NF4 experts, real tokenizer and sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.recipe import real


@pytest.mark.slow
def test_qlora_fit_on_the_sample_lowers_eval_loss(
    mixtral_tokenizer: Any, arxiv_sample: Path
) -> None:
    res = real.qlora_fit(mixtral_tokenizer, arxiv_sample)
    assert res.steps == 12
    assert [p.step for p in res.eval_loss] == [0, 12]
    assert res.eval_loss[-1].loss < res.eval_loss[0].loss - 0.5
    assert res.test_loss_after < res.test_loss_before
    # An untrained random model is near-uniform over the 32k vocabulary.
    assert res.test_loss_before == pytest.approx(math.log(32000), abs=0.2)
    assert res.perplexity_before > res.perplexity_after > 1
    assert len(res.routing_load) == len(res.routing_load_before) == 2
    # The random router spreads tokens: every expert gets some before training.
    assert min(min(layer) for layer in res.routing_load_before) > 0.05
    for layer in res.routing_load + res.routing_load_before:
        assert len(layer) == 4
        assert sum(layer) == pytest.approx(1.0, abs=1e-9)
    # Weights by storage come from the model census (4-bit experts are small).
    assert res.memory.weights == res.model.loaded.census().total_bytes
    assert [c.name for c in res.checkpoints] == ["checkpoint-6", "checkpoint-12"]
