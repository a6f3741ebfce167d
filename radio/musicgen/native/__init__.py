"""radio's own CPU kernels (``kernels.cpp``): integer dot products for 8- and 4-bit weights, attention over an
8-bit KV cache, and a decode step's decoder layers made of the two (:mod:`.layers`), for CPUs with AVX-512 and
its VNNI instructions (Intel since Cascade Lake, AMD since Zen 4).

Why: a decode step multiplies a couple of rows by every weight. PyTorch's CPU weight-only kernels turn each
weight back into a float before they multiply it; on a small machine that arithmetic, not memory, sets their
speed, and it grows with every row (each station adds two). These kernels quantize each row of activations to
int8 instead (one scale per row) and multiply with ``vpdpbusd`` (64 multiply-adds an instruction), so reading
the weights sets the pace again and more rows cost little. PyTorch's compiler reads an 8-bit cache
at a third of the speed it reads a bf16 one; ``attend8`` reads it as bytes.

The library is built once per machine with PyTorch's extension builder (g++ and ninja; the build is cached in
``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default; ~15 s on two cores) the first time a model asks
for it, and used only where it loads and agrees with the float math on a probe. Anything else (another CPU, no
compiler, a failed build) leaves the model on PyTorch's kernels and says why once (:func:`why_not`).
``RADIO_NATIVE_KERNELS=0`` keeps them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

__all__ = ["HEAD_SIZES", "attend8", "available", "decode_layers", "fits", "linear", "pack4", "pack8", "quantize4",
           "quantize8", "unpack", "why_not"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
BLOCK = 16  # output channels per block of the packed weights (kernels.cpp)
HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128)  # the head sizes attend8 takes (every MusicGen's is 64)

_lock = threading.Lock()
_state: dict[str, str | bool] = {}


def why_not() -> str | None:
    """Why the kernels are off (None where they are on or not asked for yet)."""
    reason = _state.get("why")
    return reason if isinstance(reason, str) else None


def available() -> bool:
    """Are the kernels built, loaded and checked on this machine? (Built and checked on the first call.)"""
    with _lock:
        if "ok" not in _state:
            reason = _load()
            _state["ok"] = reason is None
            if reason is not None:
                _state["why"] = reason
                # a CPU without the instructions is expected; a failed build or probe on one with them is not
                log = logger.info if reason.startswith(("this CPU", "built for", "RADIO_")) else logger.warning
                log("radio's CPU kernels are off: %s; PyTorch's kernels serve", reason)
        return bool(_state["ok"])


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _load() -> str | None:
    if os.environ.get("RADIO_NATIVE_KERNELS", "1") == "0":
        return "RADIO_NATIVE_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for Linux on x86-64 only (this is {platform.system()} on {platform.machine()})"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        # The builder runs `ninja` from PATH: the ninja package's own where the environment is not activated
        # (a systemd unit, `.venv/bin/python -m ...`).
        os.environ["PATH"] = os.pathsep.join([*_ninja_dirs(), path])
        source = SOURCE.read_bytes()
        key = source + " ".join([*COMPILE_FLAGS, torch.__version__]).encode()  # a new PyTorch builds anew
        name = "radio_cpu_" + hashlib.sha256(key).hexdigest()[:12]
        load(name=name, sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: PyTorch's kernels serve
        lines = [line for line in str(exc).splitlines() if "error" in line.lower()] or str(exc).splitlines() or [""]
        return f"build failed ({type(exc).__name__}: {lines[-1].strip()[:300]})"
    finally:
        os.environ["PATH"] = path
    _register_fakes()
    return _probe()


def _ninja_dirs() -> list[str]:
    try:
        import ninja

        return [str(ninja.BIN_DIR)]
    except (ImportError, AttributeError):
        return []


def _register_fakes() -> None:
    """Shapes for PyTorch's compiler (the compiled decode layer calls the ops as they are). Once: :func:`_load`
    runs once a process."""

    @torch.library.register_fake("radio_cpu::linear")
    def _linear_shape(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, extra: torch.Tensor,
                      out_features: int, bits: int, group: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("radio_cpu::attend8")
    def _attend8_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        return q.new_empty(q.shape)


def _probe() -> str | None:
    """The ops against float math on random numbers: None, or what disagreed."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=gen) * 0.05
    x = torch.randn(3, 128, generator=gen)
    for bits in (8, 4):
        packed, dense = (pack8(w) if bits == 8 else pack4(w, 32))
        want = x @ dense.t()
        got = linear(x, packed, 48, bits, 32)
        error = float((got - want).norm() / want.norm())
        if not error < 0.03:  # the activations' rounding: ~1 %
            return f"the {bits}-bit product is off by {error:.1%} on a probe"
    from ..decoding import kv8_dequantize, kv8_pack

    rows, heads, cols = 3, 2, 40
    q = torch.randn(rows, heads, 64, generator=gen)
    k = kv8_pack(torch.randn(rows, heads, cols, 64, generator=gen))
    v = kv8_pack(torch.randn(rows, heads, cols, 64, generator=gen))
    bias = torch.zeros(rows, cols)
    bias[0, 30:] = torch.finfo(torch.float32).min
    bias[2, :5] = torch.finfo(torch.float32).min
    scores = (q[:, :, None] @ kv8_dequantize(k).transpose(2, 3))[:, :, 0] * 0.125 + bias[:, None]
    want = torch.softmax(scores, -1)[:, :, None] @ kv8_dequantize(v)
    got = attend8(q, k, v, bias, 0.125)
    error = float((got - want[:, :, 0]).abs().max())
    if not error < 1e-4:
        return f"the 8-bit attention is off by {error:.2g} on a probe"
    return None


def quantize8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, in) as int8 codes and a float32 scale per output channel (absolute maximum / 127): the
    8-bit quantization of every kernel (PyTorch's and radio's)."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight (out, in) as 4-bit codes (uint8 0..15) with a float32 scale and low per ``group`` inputs and
    output channel (out, groups): weight ~ code * scale + low. The 4-bit quantization of every kernel."""
    n, k = weight.shape
    g = weight.detach().float().reshape(n, k // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return codes, scale, low


def pack8(weight: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A float weight (out, in) as the 8-bit kernel's operands, and the weight they stand for (dequantized,
    float32)."""
    q, scale = quantize8(weight)
    return pack8_codes(q, scale), q.float() * scale[:, None]


def pack8_codes(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes (out, in) and per-channel scales (out,) in the kernel's layout: blocks of 16 channels, four
    inputs a channel at a time; float32 scales; each channel's sum of codes."""
    n, k = q.shape
    w = q.view(n // BLOCK, BLOCK, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return w, scale.float().contiguous(), q.sum(1, dtype=torch.int32)


def pack4(weight: torch.Tensor, group: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A float weight (out, in) as the 4-bit kernel's operands (asymmetric, ``group`` inputs per scale), and the
    weight they stand for (dequantized, float32)."""
    n, k = weight.shape
    codes, scale, low = quantize4(weight, group)
    scale, low = scale.to(torch.bfloat16), low.to(torch.bfloat16)
    dense = (codes.view(n, k // group, group).float() * scale.float()[..., None] + low.float()[..., None])
    return pack4_codes(codes, scale, low), dense.view(n, k)


def pack4_codes(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes (out, in) uint8 0..15 with their scale and low (out, groups) in the kernel's layout, one
    stream per block of 16 channels: (blocks, groups, 64 + 8 x group) uint8, each group's 16 bf16 scales and 16
    bf16 lows, then per 8 inputs and channel 4 bytes holding inputs i (low nibble) and i + 4 (high nibble). (The
    op's other two operands are empty.)"""
    n, k = codes.shape
    groups = scale.shape[1]
    v = codes.view(n // BLOCK, BLOCK, groups, k // groups // 8, 2, 4)
    packed = (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(n // BLOCK, groups, -1)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # (blocks, groups, 32) bytes
        b = t.to(torch.bfloat16).reshape(n // BLOCK, BLOCK, groups).permute(0, 2, 1).contiguous()
        return b.view(torch.uint8)

    w = torch.cat([per_block(scale), per_block(low), packed], dim=2).contiguous()
    empty = torch.empty(0, dtype=torch.uint8)
    return w, empty, empty


def fits(out_features: int, in_features: int) -> bool:
    """Does the kernel take a layer of this shape (blocks of 16 outputs, inputs 8 at a time)?"""
    return out_features % BLOCK == 0 and in_features % 8 == 0


def unpack(w: torch.Tensor, scales: torch.Tensor, extra: torch.Tensor, out_features: int, bits: int) -> torch.Tensor:
    """A packed weight (:func:`pack8_codes`, :func:`pack4_codes`) back as bf16 (out, in): what the kernel
    multiplies by (prefills multiply by this)."""
    if bits == 8:
        codes = w.permute(0, 2, 1, 3).reshape(out_features, -1)
        return codes.to(torch.bfloat16) * scales.to(torch.bfloat16)[:, None]
    blocks, groups = w.shape[0], w.shape[1]

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (blocks, groups, 32) bytes -> (out, groups, 1) bf16
        return t.contiguous().view(torch.bfloat16).permute(0, 2, 1).reshape(out_features, groups, 1)

    scale, low = per_channel(w[:, :, :32]), per_channel(w[:, :, 32:64])
    v = w[:, :, 64:].reshape(blocks, groups, -1, BLOCK, 4)  # (blocks, groups, steps, 16, 4)
    codes = torch.stack([v & 15, v >> 4], 3)  # (blocks, groups, steps, 2, 16, 4)
    codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(out_features, groups, -1)
    return (codes.to(torch.bfloat16) * scale + low).view(out_features, -1)


def linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out_features: int, bits: int,
           group: int) -> torch.Tensor:
    """x (rows, in) float32 or bf16 times the packed weight: (rows, out) in x's dtype."""
    w, scales, extra = packed
    return torch.ops.radio_cpu.linear(x, w, scales, extra, out_features, bits, group)


def attend8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query per row and head, q (rows, H, d) (d in :data:`HEAD_SIZES`), over an 8-bit cache k, v (rows, H,
    columns, d + 4) with the additive mask ``bias`` (rows, columns): (rows, H, d) in q's dtype. Columns the mask
    holds at the dtype's minimum are not read."""
    return torch.ops.radio_cpu.attend8(q, k, v, bias, scaling)


def decode_layers(h: torch.Tensor, norms: list[torch.Tensor], weights: list[torch.Tensor], kc: list[torch.Tensor],
                  vc: list[torch.Tensor], xk: list[torch.Tensor], xv: list[torch.Tensor], uncond: torch.Tensor,
                  columns: torch.Tensor, self_bias: torch.Tensor, cross_bias: torch.Tensor, heads: int, ffn: int,
                  eps: float, scaling: float, halves: bool) -> torch.Tensor:
    """A decode step's decoder layers in one call (:class:`.layers.LayerStack` holds the operands): rows h
    (R, D) of one new token each -> (R, D) before the final norm; each layer's new key and value written into its
    8-bit cache kc[i], vc[i] (R, H, columns, d + 4) at ``columns`` (R,)."""
    return torch.ops.radio_cpu.decode_layers(h, norms, weights, kc, vc, xk, xv, uncond, columns, self_bias,
                                             cross_bias, heads, ffn, eps, scaling, halves)
