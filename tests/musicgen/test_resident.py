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
        unreleased = MusicgenModel(str(tiny_model_dir), device="cpu", seed=0)
    assert resident.mapped_tensors(unreleased.model), "the checkpoint's tensors are expected mapped after loading"
    del unreleased

    model = MusicgenModel(str(tiny_model_dir), device="cpu", seed=0)

    assert resident.mapped_tensors(model.model) == []
    assert (resident.resident_bytes() or 0) > 0
