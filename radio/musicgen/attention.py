"""Decode attention over each row's live columns only (split-K, "flash-decoding"), as a Triton kernel.

A decode step has ONE query per row, and its self-attention reads the row's whole KV cache: on a GPU with many
mounts that read is most of the step (musicgen-small at 128 mounts, H100: 24 layers x ~0.5 ms of a ~17 ms
step). PyTorch's fused kernels either read the whole window under a mask (the memory-efficient kernel: at the
card's bandwidth, but a station 20 s into a 30 s window pays for 30 s) or pad the single query to a block of
64-128 rows (flash with per-row lengths: compute-bound at this shape; measured no faster). This kernel reads
exactly the live columns: one program per (row, head, split) walks its share of the row's columns with an
online softmax, and a second pass combines the splits. Splits are chosen per batch so a small batch still
fills the card (one mount: 32 rows x heads would leave most of it idle).

The same kernel runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), which is how the tests hold it to the eager attention. :func:`available` says whether it may be
used here: triton importable, a CUDA device (or the interpreter), and agreement with the masked kernel on a
probe; otherwise the step keeps PyTorch's kernel.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

BLOCK = 64  # columns per iteration
TARGET_PROGRAMS = 528  # ~4 programs per SM of an H100: enough in flight to stream at the card's bandwidth


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def installed() -> bool:
    """Whether triton is installed (the kernels can be built)."""
    return _kernels() is not None


def _kernels() -> Any:
    """The kernel module, or None where triton is not installed."""
    try:
        from . import attention_kernels
    except ImportError:  # triton ships with PyTorch's CUDA builds; elsewhere the step keeps PyTorch's kernels
        return None
    return attention_kernels


def splits_for(rows: int, heads: int) -> int:
    """Splits of each row's columns: a power of two, enough programs to fill the card, at most 32."""
    want = max(1, TARGET_PROGRAMS // max(1, rows * heads))
    return min(32, 1 << (want.bit_length() - 1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (rows, H, d); k, v (rows, H, W, d) with the last dim contiguous; live (rows,) int32: how many leading
    columns of each row to attend to (>= 1). Returns (rows, H, d) in q's dtype. Fixed shapes, no host
    synchronisation: safe inside a captured CUDA graph."""
    rows, H, W, D = k.shape
    splits = splits_for(rows, H)
    out = torch.empty((rows, H, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        acc = torch.empty((rows * H, splits, D), dtype=torch.float32, device=q.device)
        m = torch.empty((rows * H, splits), dtype=torch.float32, device=q.device)
        l_sum = torch.empty((rows * H, splits), dtype=torch.float32, device=q.device)
    else:
        acc = m = l_sum = out  # unused
    kernels = _kernels()
    kernels.split_kernel[(rows * H, splits)](q, k, v, live, acc, m, l_sum, out, scale,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                                      H=H, D=D, SPLITS=splits, BLOCK_N=BLOCK)
    if splits > 1:
        kernels.combine_kernel[(rows * H,)](acc, m, l_sum, out, D=D, SPLITS=splits)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in plain PyTorch (masked over the whole window)."""
    cols = torch.arange(k.shape[2], device=k.device)
    bias = torch.where(cols[None, :] < live[:, None].long(), 0.0, float("-inf"))[:, None, None, :]
    w = torch.matmul(q[:, :, None].float(), k.float().transpose(2, 3)) * scale + bias
    return torch.matmul(torch.softmax(w, dim=-1), v.float())[:, :, 0].to(q.dtype)


_checked: dict[Any, bool] = {}


def available(device: str, dtype: torch.dtype, heads: int, head_dim: int) -> bool:
    """Whether :func:`decode_attention` may be used on this device for this shape (probed once, cached)."""
    key = (device, dtype, heads, head_dim)
    if key in _checked:
        return _checked[key]
    ok = False
    if (device.startswith("cuda") or interpreted()) and _kernels() is not None and head_dim == 2 ** int(
            math.log2(head_dim)):
        try:
            g = torch.Generator(device=device).manual_seed(0)
            rows, W = 3, 150
            k = torch.randn(rows, heads, W, head_dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(rows, heads, W, head_dim, device=device, dtype=dtype, generator=g)
            q = torch.randn(rows, heads, head_dim, device=device, dtype=dtype, generator=g)
            live = torch.tensor([1, 70, W], device=device, dtype=torch.int32)
            got = decode_attention(q, k, v, live, head_dim ** -0.5).float()
            want = reference(q, k, v, live, head_dim ** -0.5).float()
            ok = bool(torch.allclose(got, want, atol=2e-2, rtol=2e-2))
            if not ok:
                logger.warning("the live-column attention kernel disagrees with PyTorch's here; not using it")
        except Exception as exc:  # noqa: BLE001 - any failure to compile or run: keep PyTorch's kernels
            logger.info("live-column attention kernel unavailable (%s)", str(exc).splitlines()[0][:160])
    _checked[key] = ok
    return ok
