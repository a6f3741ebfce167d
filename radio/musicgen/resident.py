"""What a loaded model keeps resident: its own tensors, not the checkpoint file's pages.

``from_pretrained`` maps a safetensors checkpoint into memory and hands out tensors that are views of the map
wherever it does not convert them (musicgen-small's T5 encoder stays float32, as stored). One such view keeps
the whole map alive, and every page the load read stays in the process's resident set: musicgen-small's 2.2 GB
file stayed resident beside an int8 decoder of 0.35 GB (RSS after loading 3.9 GB; 1.5 GB once released,
measured on a 2-core AMD EPYC, 2026-12-02). Those pages are clean and the kernel may drop them under
pressure, but an operator reads RSS, and a machine sized by it buys memory the model does not need.

:func:`release_checkpoint` copies the tensors that still live in a file map into the process's own memory (the
map closes with its last view) and hands the heap's free pages back to the system (``radio.native.trim``: the
quantization and the dtype changes free the dense weights they replaced, which the C allocator otherwise
keeps).
The model does so for every dtype but float32, whose map something outside the modules' tensors keeps (not
found), so that copies would only add to it.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from ..native import trim

logger = logging.getLogger(__name__)

MAPS = "/proc/self/maps"


def file_maps(path: str = MAPS) -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory maps (Linux; empty where ``/proc`` has none). A hub
    checkpoint maps as the cache's blob (a hash, no ``.safetensors``), so every file-backed range counts: tensors
    do not live in the shared libraries' ranges."""
    ranges = []
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def mapped_tensors(module: Any, ranges: list[tuple[int, int]] | None = None) -> list[tuple[Any, str, Any]]:
    """(owner module, name, tensor) for each parameter and buffer of ``module`` whose memory lies in a file map."""
    ranges = file_maps() if ranges is None else ranges
    found: list[tuple[Any, str, Any]] = []
    if not ranges:
        return found
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.is_mkldnn:
                    continue  # oneDNN's packed weights are opaque, and made at load: never the file's
                address = tensor.untyped_storage().data_ptr()
                if any(start <= address < end for start, end in ranges):
                    found.append((owner, name, tensor))
    return found


def release_checkpoint(module: Any) -> int:
    """Copy every parameter and buffer of ``module`` that is a view of a file map into memory of its own (the
    same values, dtype and shape; a tensor shared by several modules is copied once and stays shared), then
    return the heap's free pages to the system. Returns the bytes copied."""
    gc.collect()  # views in garbage cycles (the load's and the compile probe's) keep the map alive as well
    copied = 0
    seen: set[int] = set()
    for _owner, _name, tensor in mapped_tensors(module):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor.data = tensor.data.clone()  # in place on the Parameter/buffer object: tied weights stay tied
        copied += tensor.numel() * tensor.element_size()
    trim()
    return copied


def resident_bytes(path: str = "/proc/self/status") -> int | None:
    """This process's resident set size now (VmRSS), or None where ``/proc`` has none."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
