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
from typing import Any

import torch
from torch import nn

from ..config import WEIGHTS
from . import native

__all__ = ["WEIGHTS", "PackedLinear", "QuantLinear", "accelerate", "join_projections", "quantize_linears",
           "quantization_works"]

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


def padded_rows(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """``x`` as a contiguous 2-D block of rows, padded with zero rows to a :func:`row_bucket` size (the caller
    slices them off), and how many rows are real."""
    flat = x.reshape(-1, in_features)
    rows = flat.shape[0]
    padded = row_bucket(rows)
    if padded != rows:
        return torch.nn.functional.pad(flat, (0, 0, 0, padded - rows)), rows
    return flat.contiguous(), rows


@torch.library.custom_op("radio::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear over a weight packed by ``_reorder_linear_weight``: an op of our own, so that the compiled
    decode step (:mod:`.compiled`) calls it as it is (PyTorch's compiler would re-lower the private op and
    expects a weight it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


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
        flat, rows = padded_rows(x, self.in_features)
        if torch.compiler.is_compiling():  # traced into the compiled step: our op, called as it is
            y = packed_linear(flat, self.weight, self.bias)
        else:  # eager: the private op directly (a custom op's dispatch costs microseconds, ~200 calls a step)
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


# -- weight-only quantization (CPU) ----------------------------------------------------------------------------
# A decode step is bound by the bytes of weights it reads, not by arithmetic: 8-bit weights read half the bytes of
# bf16, 4-bit a quarter. PyTorch's CPU kernels for these (``_weight_int8pack_mm``: int8 per output channel;
# ``_weight_int4pack_mm_for_cpu``: int4 in groups, packed once by ``_convert_weight_to_int4pack_for_cpu``) take bf16
# activations. Measured on a 2-core Zen 4 over 48 layers of 1024x4096 (out of cache), 2 rows: bf16 packed 225 us a
# layer, int8 151 us, int4 87 us.
# Layers on PyTorch's kernels called with more rows than this (prefills) multiply a dense copy of their weight made
# for the call: the GEMM is arithmetic-bound there, where those weight-only kernels are slow (2-core Zen 4, a
# 4096x1024 layer at 1000 rows: int4 kernel 29-35 ms, dequantize ~3 ms + bf16 GEMM ~11 ms). radio's kernel takes
# a prefill's rows itself, in tiles that stay in cache (the same layer: 10.6 ms int8, 9.9 int4, against 10.8 for
# the bf16 GEMM alone; a 10 s reset of musicgen-small int8 1.77 -> 1.50 s, 2-core AMD EPYC, 2026-12-02).
DEQUANTIZE_ROWS = {8: 64, 4: 128}
INT4_BLOCK = 64  # the CPU int4 packing's block of output channels (see _int4_unpack)
INT4_GROUPS = (64, 32)  # inputs per int4 scale: 64 where the layer's width allows, else 32

class QuantLinear(nn.Module):
    """``nn.Linear`` with weight-only int8 (per output channel) or int4 (asymmetric, groups of 64 or 32 inputs)
    weights, packed once; activations in bf16, rows padded to :func:`row_bucket` sizes."""

    weight: torch.Tensor
    scales: torch.Tensor
    extra: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, bits: int, kernel: str = "torch") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bits = bits
        self.unpackable = bits == 8  # can dense() read the weight back (int4: a packing layout checked below)
        self.group = next((g for g in INT4_GROUPS if self.in_features % g == 0), INT4_GROUPS[-1])
        # radio's own kernel (native: integer dot products) where asked and the shape suits it
        self.kernel = ("native" if kernel == "native" and native.fits(self.out_features, self.in_features)
                       and native.available() else "torch")
        self.register_buffer("extra", None, persistent=False)  # native: 8-bit codes' sums, or 4-bit lows
        with torch.no_grad():
            if bits == 8:
                q, scale = native.quantize8(linear.weight)
                if self.kernel == "native":
                    packed, scales, extra = native.pack8_codes(q, scale)
                    self.register_buffer("extra", extra, persistent=False)
                else:
                    packed, scales = q, scale.to(torch.bfloat16)
                self.register_buffer("weight", packed, persistent=False)
                self.register_buffer("scales", scales, persistent=False)
            elif bits == 4:
                codes, scale, lo = native.quantize4(linear.weight, self.group)
                if self.kernel == "native":
                    packed, scales, extra = native.pack4_codes(codes, scale, lo)
                    self.register_buffer("weight", packed, persistent=False)
                    self.register_buffer("scales", scales, persistent=False)
                    self.register_buffer("extra", extra, persistent=False)
                    self.unpackable = True
                else:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
                    # the kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale
                    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                    self.register_buffer("weight", packed, persistent=False)
                    self.register_buffer("scales", sz, persistent=False)
                    # The packed layout is the kernel's (and may differ by CPU): read back only where it reads as
                    # known.
                    unpacked = _int4_unpack(packed, self.out_features, self.in_features)
                    self.unpackable = unpacked is not None and torch.equal(unpacked, codes)
            else:
                raise ValueError(f"{bits}-bit weights are not supported")
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def joined(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """One layer whose output is ``parts``' outputs side by side (a self-attention's q, k and v: one call and
        one rounding of the activations where there were three), or None where they are not all radio's kernel
        at one width and input size without a bias. Its buffers are the parts' joined along the output channels
        (the packing's blocks of 16 channels come first in every buffer); each part's buffers become views of
        them, so the model holds the weights once."""
        first = parts[0]
        if any(p.kernel != "native" or p.extra is None or p.bias is not None or p.bits != first.bits
               or p.in_features != first.in_features or p.group != first.group for p in parts):
            return None
        whole = cls.__new__(cls)
        nn.Module.__init__(whole)
        whole.in_features, whole.bits, whole.group = first.in_features, first.bits, first.group
        whole.out_features = sum(p.out_features for p in parts)
        whole.kernel, whole.unpackable = "native", all(p.unpackable for p in parts)
        for name in ("weight", "scales", "extra"):
            joined = torch.cat([getattr(p, name) for p in parts])
            whole.register_buffer(name, joined, persistent=False)
            start = 0
            for p in parts:
                size = getattr(p, name).shape[0]
                setattr(p, name, joined[start:start + size])  # a view: one copy of the weights
                start += size
        whole.register_buffer("bias", None, persistent=False)
        return whole

    @staticmethod
    def fits(linear: nn.Linear, bits: int) -> bool:
        return bits == 8 or (linear.in_features % INT4_GROUPS[-1] == 0 and linear.out_features % 16 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this ~200 times: the fewest ops around the kernel (no copies where the input is
        # already a contiguous bf16 block of a bucket's rows, the bias added in place).
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.bfloat16 and (self.kernel != "native" or flat.dtype != torch.float32):
            flat = flat.to(torch.bfloat16)
        rows = flat.shape[0]
        if rows > EXACT_ROWS or not flat.is_contiguous():
            flat, rows = padded_rows(flat, self.in_features)
        if self.extra is not None:  # radio's kernel, a step's rows or a prefill's (it tiles many rows)
            y = native.linear(flat, (self.weight, self.scales, self.extra), self.out_features, self.bits, self.group)
        elif flat.shape[0] > DEQUANTIZE_ROWS[self.bits] and self.unpackable:
            y = torch.nn.functional.linear(flat, self.dense().to(flat.dtype))  # a prefill: see DEQUANTIZE_ROWS
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scales)
        if self.bias is not None:
            y.add_(self.bias)
        if y.shape[0] != rows:
            y = y[:rows]
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dense(self) -> torch.Tensor:
        """The weight dequantized, (out, in) bf16: what the kernels multiply by."""
        if self.extra is not None:
            return native.unpack(self.weight, self.scales, self.extra, self.out_features, self.bits)
        if self.bits == 8:
            return self.weight.to(torch.bfloat16) * self.scales[:, None]
        q = _int4_unpack(self.weight, self.out_features, self.in_features)
        if q is None or not self.unpackable:  # never where forward calls it
            raise ValueError("this int4 packing cannot be read back")
        groups = self.in_features // self.group
        scale = self.scales[..., 0].t().unsqueeze(-1)  # (out, groups, 1)
        zero = self.scales[..., 1].t().unsqueeze(-1)
        w = q.view(self.out_features, groups, self.group).to(torch.bfloat16)
        return (w * scale).add_(zero - 8 * scale).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f" (groups of {self.group})" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights=int{self.bits}{group}, "
                f"kernel={self.kernel}")


def _int4_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor | None:
    """The 4-bit codes (out, in) uint8 of ``_convert_weight_to_int4pack_for_cpu``'s packing, or None where the
    packing is not the layout read here: blocks of 64 output channels, each input's 32 bytes holding channel
    ``j`` in the low nibble and ``j + 32`` in the high one. (The layout is the kernel's business: callers check
    the result against the codes they packed.)"""
    if packed.dtype != torch.uint8 or out_features % INT4_BLOCK or packed.numel() * 2 != out_features * in_features:
        return None
    v = packed.reshape(out_features // INT4_BLOCK, in_features, INT4_BLOCK // 2)
    q = torch.stack([v & 15, v >> 4], 1)  # (blocks, nibble, in, 32)
    return q.permute(0, 1, 3, 2).reshape(out_features, in_features)


def quantization_works(bits: int) -> bool:
    """Do this PyTorch's weight-only kernels exist and agree with a dense bf16 layer on a probe (relative error
    within what ``bits`` allow)?"""
    try:
        gen = torch.Generator().manual_seed(0)
        dense = nn.Linear(128, 64)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(64, 128, generator=gen) * 0.05)
            dense.bias.copy_(torch.randn(64, generator=gen) * 0.05)
            x = torch.randn(3, 128, generator=gen)
            want = dense(x)
            got = QuantLinear(dense, bits)(x).float()
        error = float((got - want).norm() / want.norm())
        return got.shape == want.shape and error < (0.03 if bits == 8 else 0.2)
    except Exception as exc:  # noqa: BLE001 - any failure of these ops means: do not use them
        logger.debug("int%d weights unavailable: %s", bits, exc)
        return False


def join_projections(module: nn.Module) -> int:
    """Give every self-attention under ``module`` whose q, k and v projections are radio's quantized kernels one
    product for the three, ``qkv_proj`` (:meth:`QuantLinear.joined`; the step's layer calls it in their place,
    transformers' own forward keeps calling the three); returns how many. A decode step's products go from 8 to 6
    a layer: two fewer calls and two fewer roundings of the activations."""
    count = 0
    for owner in list(module.modules()):
        attn: Any = getattr(owner, "self_attn", None)
        projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        quantized = [p for p in projections if isinstance(p, QuantLinear)]
        if len(quantized) != 3:
            continue
        whole = QuantLinear.joined(quantized)
        if whole is not None:
            attn.qkv_proj = whole
            count += 1
    return count


def quantize_linears(module: nn.Module, bits: int, kernel: str = "torch") -> int:
    """Replace every ``nn.Linear`` under ``module`` whose shape the kernel takes by a ``QuantLinear`` (``kernel``:
    ``native`` for radio's own where a layer's shape suits it, else ``torch``); returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and QuantLinear.fits(child, bits):
                setattr(parent, name, QuantLinear(child, bits, kernel))
                count += 1
    return count
