"""A loaded model keeps its own tensors resident, not the checkpoint file's memory map."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from radio.musicgen import resident
from radio.musicgen.model import MusicgenModel

linux = pytest.mark.skipif(not Path(resident.MAPS).exists() or sys.platform != "linux",
                           reason="file maps are read from /proc/self/maps (Linux)")


def _mapped_module(path: Path) -> torch.nn.Module:
    """A module whose weight is a view of a file map (as from_pretrained hands out), tied into a second module,
    and whose bias is its own memory."""
    values = torch.arange(64, dtype=torch.float32)
    path.write_bytes(values.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=64 * 4)
    mapped = torch.tensor([], dtype=torch.float32).set_(storage).view(8, 8)
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    first.weight = torch.nn.Parameter(mapped, requires_grad=False)
    second.weight = first.weight  # tied, as T5's shared embedding is
    return torch.nn.Sequential(first, second)


@linux
def test_release_copies_mapped_weights_out_of_the_file_map_and_keeps_them_tied(tmp_path: Path) -> None:
    module = _mapped_module(tmp_path / "weights.bin")
    bias = module[0].bias.data_ptr()
    found = resident.mapped_tensors(module)
    assert [(owner, name) for owner, name, _ in found] == [(module[0], "weight"), (module[1], "weight")]

    copied = resident.release_checkpoint(module)

    assert copied == 64 * 4  # the tied weight once
    assert resident.mapped_tensors(module) == []
    assert torch.equal(module[0].weight, torch.arange(64, dtype=torch.float32).view(8, 8))
    assert module[1].weight is module[0].weight  # still one tensor
    assert module[0].bias.data_ptr() == bias  # a tensor of its own memory is left as it was


def test_without_file_maps_nothing_is_copied(tmp_path: Path) -> None:
    module = _mapped_module(tmp_path / "weights.bin")
    with mock.patch.object(resident, "file_maps", return_value=[]):
        assert resident.release_checkpoint(module) == 0
    assert resident.file_maps(str(tmp_path / "no-such-file")) == []
    assert resident.resident_bytes(str(tmp_path / "no-such-file")) is None


@linux
def test_a_loaded_model_holds_no_tensor_of_its_checkpoint_file(tiny_model_dir: Path) -> None:
    with mock.patch.object(resident, "release_checkpoint", return_value=0):  # what from_pretrained leaves
        unreleased = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="bfloat16", seed=0)
    assert resident.mapped_tensors(unreleased.model), "the checkpoint's tensors are expected mapped after loading"
    del unreleased

    model = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="bfloat16", seed=0)

    assert resident.mapped_tensors(model.model) == []
    assert (resident.resident_bytes() or 0) > 0


def test_a_models_memory_counts_each_block_once_and_shrinks_with_its_weights(tiny_model_dir: Path) -> None:
    """memory_bytes counts the joined q/k/v product once (its parts are views of it); the loaded int8 and int4
    models hold less than the bf16 one, and the estimate the memory budget admits models by says so before
    loading (what the weights save, within a quarter; never below what a model holds)."""
    from radio.musicgen.model import estimate_model_bytes

    held = {w: MusicgenModel(str(tiny_model_dir), device="cpu", seed=0, weights=w, compile="never")
            for w in ("bfloat16", "int8", "int4")}
    if any(held[w].weights != w for w in held):
        pytest.skip(f"this PyTorch's weight-only kernels are missing: {[m.weights for m in held.values()]}")
    bf16, int8, int4 = (held[w].memory_bytes() - held[w].decode_state_bytes() for w in ("bfloat16", "int8", "int4"))
    assert int4 < int8 < bf16
    layers = held["int8"].model.decoder.model.decoder.layers
    if hasattr(layers[0].self_attn, "qkv_proj"):  # radio's kernels: the parts are views of the joined product
        views = sum(getattr(layer.self_attn, n).weight.numel() for layer in layers for n in ("q_proj", "k_proj"))
        naive = sum(t.numel() * t.element_size() for t in [*held["int8"].model.parameters(),
                                                          *held["int8"].model.buffers()] if not t.is_mkldnn)
        assert naive - int8 >= views  # counted once, not twice
    estimates = {w: estimate_model_bytes(str(tiny_model_dir), "auto", "cpu", w) for w in held}
    assert estimates["int4"] < estimates["int8"] < estimates["bfloat16"]
    real = {w: model.memory_bytes() - model.decode_state_bytes() for w, model in held.items()}
    for w in ("int8", "int4"):  # what the weights save, estimated from the config, against what the models hold
        saved, estimated = real["bfloat16"] - real[w], estimates["bfloat16"] - estimates[w]
        assert abs(estimated - saved) < saved / 4, (w, estimated, saved)
    assert all(estimates[w] >= real[w] for w in held), (estimates, real)  # a budget errs on the safe side
