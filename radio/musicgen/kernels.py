"""Faster CPU kernels for the decoder's linear layers: oneDNN with weights packed once at load.

A decode step multiplies a handful of rows (two per mount with guidance) by every weight matrix of the decoder.
PyTorch's default CPU path for such skinny products (``F.linear``) streams the weights at a fraction of the
memory bandwidth (measured on a 2-core Zen 4: about 8 GB/s in fp32 against 30 GB/s for a plain read). oneDNN's
linear over a weight reordered once into its blocked layout runs the same products at 20-30 GB/s, in fp32 and
bf16 alike. This is what PyTorch's own compiler does on CPU (``mkldnn._linear_pointwise`` over
``mkldnn._reorder_linear_weight``); here it is applied directly to the loaded module, so the transformers model
keeps its structure and every caller (our decode loop, ``generate``) gets the same numbers.

Packing is checked before it is used: if the ops are missing from this PyTorch build, fail, or disagree with
``F.linear`` on a probe, the model keeps its stock layers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _ops_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


EXACT_ROWS = 16
BUCKET_BITS = 3  # 2**3 = 8 sizes per doubling


def row_bucket(rows: int) -> int:
    """``rows`` rounded up to one of a few sizes: exact up to 16, then 8 sizes per doubling (under 1/8 padding).

    oneDNN compiles a primitive per GEMM shape and keeps it in two caches (PyTorch's and oneDNN's own, 1,024
    entries each by default), about 0.28 MB in each. A daemon's row counts (stations in the batch x frames x
    guidance rows, text lengths, prefill lengths) keep finding new values for hours, so every new count added
    half a megabyte for good: a 16-station soak's RSS rose by ~30 MB an hour with no Python object growing.
    Padded to these sizes, a model meets a few dozen shapes per layer shape within minutes and no more after.
    A decode step's GEMMs read the weights whatever their rows, so the padding costs them next to nothing."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << max(0, rows.bit_length() - 1 - BUCKET_BITS)
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight held in oneDNN's packed layout (inference only); rows are padded to
    :func:`row_bucket` sizes so that the shapes it compiles stay few."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("weight", packed, persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        padded = row_bucket(rows)
        if padded != rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, padded - rows))  # zero rows, sliced off below
        elif not flat.is_contiguous():
            flat = flat.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y[:rows].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def packing_works(dtype: torch.dtype) -> bool:
    """Do the packed ops exist here and agree with ``F.linear`` in ``dtype``?"""
    if not _ops_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        dense = nn.Linear(64, 48).to(dtype)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(48, 64, generator=gen))
            dense.bias.copy_(torch.randn(48, generator=gen))
            x = torch.randn(3, 2, 64, generator=gen).to(dtype)
            want = dense(x).float()
            got = PackedLinear(dense)(x).float()
        tol = 1e-3 if dtype == torch.float32 else 0.1
        return got.shape == want.shape and bool(torch.allclose(got, want, rtol=tol, atol=tol * 8))
    except Exception as exc:  # noqa: BLE001 - any failure of a private op means: do not use it
        logger.debug("packed linear unavailable: %s", exc)
        return False


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a ``PackedLinear`` in place; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def accelerate(module: nn.Module, device: str, dtype: torch.dtype) -> bool:
    """Pack ``module``'s linear layers when on CPU and the check passes; returns whether it did."""
    if device != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not packing_works(dtype):
        return False
    n = pack_linears(module)
    logger.info("decoder: %d linear layers packed for oneDNN (%s)", n, str(dtype).replace("torch.", ""))
    return n > 0
