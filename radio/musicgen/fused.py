"""The GPU step's fused kernels (Triton): decode attention over each row's live columns only, with the step's
new key/value written as it is read; and the residual add fused with the next layer norm.

Attention (split-K, "flash-decoding"):

A decode step has ONE query per row, and its self-attention reads the row's whole KV cache: on a GPU with many
mounts that read is most of the step (musicgen-small at 128 mounts, H100: 24 layers x ~0.5 ms of a ~17 ms
step). PyTorch's fused kernels either read the whole window under a mask (the memory-efficient kernel: at the
card's bandwidth, but a station 20 s into a 30 s window pays for 30 s) or pad the single query to a block of
64-128 rows (flash with per-row lengths: compute-bound at this shape; measured no faster). This kernel reads
exactly the live columns: one program per (row, head, split) walks its share of the row's columns with an
online softmax, and a second pass combines the splits. Splits are chosen per batch so a small batch still
fills the card (one mount: 32 rows x heads would leave most of it idle). The new column is taken from the step's
own key/value (never read back from the cache) and stored by one program, which saves the two index writes a
layer would otherwise launch.

Add and norm: every sub-layer ends ``h = residual + delta`` and the next one starts ``layer_norm(h)``: one kernel
(one program per row) instead of two, three times a layer; for cross-attention it also lays the unconditional
rows' constant beside the conditional rows' output (no stack).

At one mount a step is small kernels, and their count, not the bytes they move, sets its time: with these a layer
is 13 kernels (six products, cross-attention, GELU, two for attention, three add+norms) where PyTorch's ops take
19 (two index writes, three adds, three norms and a stack more, one attention kernel fewer).

The same kernels run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), which is how the tests hold them to the eager step. :func:`available` says whether they may be
used here: triton importable, a CUDA device (or the interpreter), and agreement with PyTorch on a probe;
otherwise the step keeps PyTorch's kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .decoding import KV8_SCALE_BYTES, kv8_dequantize, kv8_pack

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
        from . import fused_kernels
    except ImportError:  # triton ships with PyTorch's CUDA builds; elsewhere the step keeps PyTorch's kernels
        return None
    return fused_kernels


def splits_for(rows: int, heads: int) -> int:
    """Splits of each row's columns: a power of two, enough programs to fill the card, at most 32."""
    want = max(1, TARGET_PROGRAMS // max(1, rows * heads))
    return min(32, 1 << (want.bit_length() - 1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     live: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k_new, v_new (rows, H, d); k, v (rows, H, W, d); last dims contiguous; live (rows,) int32: how many
    leading columns of each row to attend to, the last of them the step's new key/value, which is written into
    the cache at column ``live - 1`` as it is read; 0 for a row that sits the step out (nothing read or written,
    zeros out). Returns (rows, H, d) in q's dtype. Fixed shapes, no host synchronisation: safe inside a captured
    CUDA graph. An int8 cache (rows, H, W, d + 4) holds ``decoding.kv8_pack``ed rows: the new key/value are
    quantized as they are written, the columns dequantized as they are read."""
    rows, H, W, D = k.shape
    kv8 = k.dtype == torch.int8
    if kv8:
        D -= KV8_SCALE_BYTES
    splits = splits_for(rows, H)
    out = torch.empty((rows, H, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        acc = torch.empty((rows * H, splits, D), dtype=torch.float32, device=q.device)
        m = torch.empty((rows * H, splits), dtype=torch.float32, device=q.device)
        l_sum = torch.empty((rows * H, splits), dtype=torch.float32, device=q.device)
    else:
        acc = m = l_sum = out  # unused
    if k_new.stride() != v_new.stride() or k.stride() != v.stride():
        raise ValueError("keys and values (cached and new) must share one layout")
    kernels = _kernels()
    kernels.split_kernel[(rows * H, splits)](q, k, v, k_new, v_new, live, acc, m, l_sum, out, scale,
                                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                                             k_new.stride(0), k_new.stride(1),
                                             H=H, D=D, SPLITS=splits, BLOCK_N=BLOCK, KV8=kv8)
    if splits > 1:
        kernels.combine_kernel[(rows * H,)](acc, m, l_sum, out, D=D, SPLITS=splits)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              live: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`decode_attention` in plain PyTorch: the new key/value written, then attention masked over the whole
    window in fp32."""
    on = live > 0
    rows = torch.arange(k.shape[0], device=k.device)[on]
    pos = live.long()[on] - 1
    kv8 = k.dtype == torch.int8
    k[rows, :, pos] = kv8_pack(k_new[on]) if kv8 else k_new[on].to(k.dtype)
    v[rows, :, pos] = kv8_pack(v_new[on]) if kv8 else v_new[on].to(v.dtype)
    kf, vf = (kv8_dequantize(k), kv8_dequantize(v)) if kv8 else (k.float(), v.float())
    cols = torch.arange(k.shape[2], device=k.device)
    bias = torch.where(cols[None, :] < live[:, None].clamp(min=1).long(), 0.0, float("-inf"))[:, None, None, :]
    w = torch.matmul(q[:, :, None].float(), kf.transpose(2, 3)) * scale + bias
    out = torch.matmul(torch.softmax(w, dim=-1), vf)[:, :, 0]
    return torch.where(on[:, None, None], out, 0.0).to(q.dtype)


def add_norm(x: torch.Tensor, delta: torch.Tensor, norm: torch.nn.LayerNorm,
             uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next layer norm in one kernel: returns ``(h, norm(h))`` for ``h = x + delta``.
    x (rows, D); delta (rows, D), or with ``uncond`` (D,): delta (rows / 2, D) for the conditional rows (even),
    ``uncond`` added to every unconditional row (odd)."""
    rows, D = x.shape
    h = torch.empty((rows, D), dtype=x.dtype, device=x.device)
    y = torch.empty((rows, D), dtype=x.dtype, device=x.device)
    paired = uncond is not None
    _kernels().add_norm_kernel[(rows,)](x, delta, uncond if paired else delta, norm.weight, norm.bias, h, y,
                                        norm.eps, x.stride(0), delta.stride(0), D=D,
                                        BLOCK_D=_pow2(D), PAIRED=paired)
    return h, y


def add_norm_reference(x: torch.Tensor, delta: torch.Tensor, norm: torch.nn.LayerNorm,
                       uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_norm` as the eager step does it."""
    if uncond is not None:
        delta = torch.stack([delta, uncond.expand_as(delta)], dim=1).reshape(x.shape)
    h = x + delta
    return h, norm(h)


def _pow2(n: int) -> int:
    """The least power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


_checked: dict[Any, bool] = {}


def available(device: str, dtype: torch.dtype, heads: int, head_dim: int, kv8: bool = False) -> bool:
    """Whether the fused kernels may be used on this device for this shape: triton importable, a CUDA device (or
    the interpreter), and both kernels agreeing with PyTorch on a probe (probed once, cached); ``kv8``: over an
    8-bit cache."""
    key = (device, dtype, heads, head_dim, kv8)
    if key in _checked:
        return _checked[key]
    ok = False
    if (device.startswith("cuda") or interpreted()) and _kernels() is not None and head_dim == _pow2(head_dim):
        try:
            ok = _probe(device, dtype, heads, head_dim, kv8)
            if not ok:
                logger.warning("the fused decode kernels disagree with PyTorch's here; not using them")
        except Exception as exc:  # noqa: BLE001 - any failure to compile or run: keep PyTorch's kernels
            logger.info("fused decode kernels unavailable (%s)", str(exc).splitlines()[0][:160])
    _checked[key] = ok
    return ok


def _probe(device: str, dtype: torch.dtype, heads: int, head_dim: int, kv8: bool = False) -> bool:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    rows, W = 4, 150
    k, v = randn(rows, heads, W, head_dim), randn(rows, heads, W, head_dim)
    if kv8:
        k, v = kv8_pack(k), kv8_pack(v)
    q, k_new, v_new = randn(rows, heads, head_dim), randn(rows, heads, head_dim), randn(rows, heads, head_dim)
    live = torch.tensor([1, 0, 70, W], device=device, dtype=torch.int32)  # 0: a slot sitting the step out
    k_want, v_want = k.clone(), v.clone()
    want = reference(q, k_want, v_want, k_new, v_new, live, head_dim ** -0.5).float()
    got = decode_attention(q, k, v, k_new, v_new, live, head_dim ** -0.5).float()
    ok = torch.allclose(got, want, atol=2e-2, rtol=2e-2) and torch.equal(k, k_want) and torch.equal(v, v_want)
    D = heads * head_dim
    norm = torch.nn.LayerNorm(D, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(D))
        norm.bias.copy_(randn(D))
    x, delta, half, u = randn(2 * rows, D), randn(2 * rows, D), randn(rows, D), randn(D)
    with torch.inference_mode():
        for args in ((x, delta, norm), (x, half, norm, u)):
            for a, b in zip(add_norm(*args), add_norm_reference(*args)):
                ok = ok and torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    return bool(ok)
