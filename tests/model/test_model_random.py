"""random_checkpoint: determinism, layouts, sharding; and mixtune's safetensors reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mixtune.errors import ConfigError, ModelLoadError, UnsupportedModelError
from mixtune.model import _random as random_module
from mixtune.model import random_checkpoint, tiny_config
from mixtune.model._safetensors import SafetensorsReader


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out |= load_file(path)
    return out


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = random_checkpoint(tiny_config(), tmp_path / "a", seed=3)
    b = random_checkpoint(tiny_config(), tmp_path / "b", seed=3)
    c = random_checkpoint(tiny_config(), tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ta, tc = _all_tensors(a), _all_tensors(c)
    assert ta.keys() == tc.keys()
    assert not torch.equal(
        ta["model.layers.0.mlp.experts.gate_up_proj"], tc["model.layers.0.mlp.experts.gate_up_proj"]
    )


def test_layouts_hold_identical_weights(tmp_path: Path) -> None:
    config = tiny_config()
    fused = _all_tensors(random_checkpoint(config, tmp_path / "f"))
    original = _all_tensors(
        random_checkpoint(config, tmp_path / "o", layout="original", shard_layers=1)
    )
    inter = config.intermediate_size
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        gate_up = fused[f"{p}.mlp.experts.gate_up_proj"]
        down = fused[f"{p}.mlp.experts.down_proj"]
        assert gate_up.shape == (config.num_local_experts, 2 * inter, config.hidden_size)
        for e in range(config.num_local_experts):
            o = f"{p}.block_sparse_moe.experts.{e}"
            torch.testing.assert_close(
                gate_up[e, :inter], original[f"{o}.w1.weight"], rtol=0, atol=0
            )
            torch.testing.assert_close(
                gate_up[e, inter:], original[f"{o}.w3.weight"], rtol=0, atol=0
            )
            torch.testing.assert_close(down[e], original[f"{o}.w2.weight"], rtol=0, atol=0)
        torch.testing.assert_close(
            fused[f"{p}.mlp.gate.weight"],
            original[f"{p}.block_sparse_moe.gate.weight"],
            rtol=0,
            atol=0,
        )
    shared = [k for k in fused if "experts" not in k and "mlp.gate" not in k]
    for k in shared:
        torch.testing.assert_close(fused[k], original[k], rtol=0, atol=0)


def test_weights_look_like_transformers_init(tmp_path: Path) -> None:
    tensors = _all_tensors(random_checkpoint(tiny_config(), tmp_path, dtype=torch.float32))
    w = tensors["model.layers.1.mlp.experts.down_proj"]
    assert w.dtype == torch.float32
    assert abs(float(w.std()) - 0.02) < 0.002
    assert abs(float(w.mean())) < 0.002
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64))
    # Each tensor has its own stream: two experts are not copies of each other.
    assert not torch.equal(w[0], w[1])


def test_sharded_index_covers_every_tensor(tmp_path: Path) -> None:
    folder = random_checkpoint(tiny_config(num_hidden_layers=3), tmp_path, shard_layers=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = _all_tensors(folder)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[1]
    assert index["weight_map"]["model.layers.2.mlp.gate.weight"] == files[1]


def test_dense_checkpoint(tmp_path: Path) -> None:
    tensors = _all_tensors(random_checkpoint(tiny_config("llama", mlp_bias=True), tmp_path))
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert "model.layers.0.mlp.down_proj.bias" in tensors
    assert not any("experts" in k for k in tensors)


def test_generates_one_expert_matrix_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = random_module._random

    def spy(
        seed: int, name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype, *rest: Any
    ) -> torch.Tensor:
        sizes.append(int(torch.Size(shape).numel()))
        return real(seed, name, shape, std, dtype, *rest)

    monkeypatch.setattr(random_module, "_random", spy)
    config = tiny_config(vocab_size=64, intermediate_size=256)
    random_checkpoint(config, tmp_path)
    one_expert_matrix = config.intermediate_size * config.hidden_size
    assert max(sizes) == one_expert_matrix  # never a whole (E, 2I, H) tensor at once


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="3 problems") as info:
        random_checkpoint(tiny_config(), tmp_path, layout="mixed", dtype=torch.int8, shard_layers=0)  # type: ignore[arg-type]
    assert {p.split("=")[0] for p in info.value.problems} == {"layout", "dtype", "shard_layers"}
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        random_checkpoint(GPT2Config(), tmp_path)
    with pytest.raises(UnsupportedModelError, match="mixtral"):
        tiny_config("qwen2")


def test_reader_matches_safetensors_and_reads_slices(tmp_path: Path) -> None:
    folder = random_checkpoint(tiny_config(), tmp_path)
    reference = load_file(folder / "model.safetensors")
    with SafetensorsReader(folder / "model.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(reference)
        for name, tensor in reference.items():
            torch.testing.assert_close(reader.read(name), tensor, rtol=0, atol=0)
        key = "model.layers.0.mlp.experts.gate_up_proj"
        assert reader.shape(key) == tuple(reference[key].shape)
        torch.testing.assert_close(reader.read(key, 2), reference[key][2], rtol=0, atol=0)


def test_reader_rejects_truncated_and_garbage_files(tmp_path: Path) -> None:
    folder = random_checkpoint(tiny_config(), tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        SafetensorsReader(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelLoadError, match="not JSON"):
        SafetensorsReader(junk)
    with pytest.raises(ModelLoadError, match="cannot open"):
        SafetensorsReader(tmp_path / "absent.safetensors")
