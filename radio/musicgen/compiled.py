"""The CPU decode step's layer compiled by PyTorch's compiler (TorchInductor), checked before it is used.

On a CPU a decode step of one or two stations is a few rows through 24 layers: bound by the bytes it reads (the
weights, each row's KV cache) and by the number of operations (about fifty per layer, a few microseconds each).
PyTorch's eager ops read a bf16 cache for one query at about half the memory bandwidth (a matmul of one row), and
pay each small op's dispatch. Compiled, :func:`.step.layer_step` becomes a handful of C++ loops per layer: the
attention (both matmuls, the mask and the softmax, the new key/value's write) is one vectorised pass over the
cache, each residual add with the following layer norm another, the weight-only or packed linear layers stay
the kernels they are (measured on a 2-core Zen 4, small shape, int4 weights, one station at 20 s of context:
see the README's CPU table).

The layer takes only tensors and constants, so ONE compiled copy serves all the layers of a model (and every
model of the same layout); shapes are dynamic (a cache's columns grow every step), and a new batch form (one
station, then several) compiles once more. Compiling needs a C++ compiler: :func:`compile_layer` compiles the
model's first layer on a probe and holds it to the eager layer; where that fails or disagrees, the model keeps
the eager layer (and says so). Compiled code is cached on disk by PyTorch (``TORCHINDUCTOR_CACHE_DIR``,
``/tmp/torchinductor_<user>`` by default), so a restart compiles in seconds. An error inside a compiled step
(a recompile that fails) switches that model back to the eager layer for good.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..config import COMPILE
from .decoding import kv8_dequantize, kv8_pack
from .step import DecoderParts, layer_step

__all__ = ["COMPILE", "CompiledLayer", "compile_layer"]

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # batch forms x models x guidance layouts; past it PyTorch runs the eager layer (same math)
PROBE_COLUMNS = 24  # the probe cache's width, or the next size no other input of the layer has (see _probe_sizes)
PROBE_PROMPT = 6


class CompiledLayer:
    """:func:`.step.layer_step`, compiled; falls back to the eager layer for good if a compiled call fails.

    Every call of a compiled function first checks its guards: that the inputs are the kinds of tensors it was
    compiled for (dtypes, strides, how their sizes relate: about 30 tensors, the layer's weights among them).
    On a 2-core CPU that is ~100-150 us of a layer's ~1 ms, 24 times a step. Inside :meth:`chunk` (the decode
    loop's steps, each made of the same kinds of tensors as the one before) a batch form's code is checked on
    its first call for each layer and called without the check after that; elsewhere (prefills, probes) every
    call goes through the checked path, which compiles anew where an input differs."""

    def __init__(self) -> None:
        import torch._dynamo

        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        self._compiled: Any = torch.compile(layer_step, dynamic=True, fullgraph=True)
        self.failed: str | None = None  # why it fell back, if it did
        self._unchecked: dict[int, Any] = {}  # batch form (_form) -> its code, callable without the check
        self._checked: dict[tuple[int, int], bool] | None = None  # in chunk(): (layer, form) -> guards held
        self.unchecked_calls = 0

    def probe(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The compiled layer without the fallback: a failure raises."""
        return self._compiled(*args, **kwargs)

    def prepare(self, *args: Any) -> None:
        """Compile the batch form of these arguments (a probe's, made as the decode loop makes its own) as a
        function :meth:`chunk` may call without its guards. Where that fails, the form keeps the checked path."""
        fn: Any = None
        for attempt in range(2):  # the first capture may stop to restart with what it learned (as Dynamo does)
            try:
                fn = self._compiled.aot_compile((args, {}))
                break
            except Exception as exc:  # noqa: BLE001 - an older PyTorch, an input it cannot capture: checked path
                if attempt:
                    logger.info("decoder layer: every call checks its guards (%s)", _reason(exc))
                    return
        fn.disable_guard_check()  # checked by _call, once per layer and chunk
        self._unchecked[_form(args)] = fn

    def forms(self) -> set[int]:
        """The batch forms (1: one station; 2: several) with code callable without the guards' check."""
        return set(self._unchecked)

    def drop(self, form: int) -> None:
        """Forget a form made by :meth:`prepare`: that batch form keeps the checked path."""
        self._unchecked.pop(form, None)

    @contextmanager
    def chunk(self) -> Iterator[None]:
        """A chunk's steps: each layer's first call per batch form checks the guards, its later calls skip them."""
        self._checked = {}
        try:
            yield
        finally:
            self._checked = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._call(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - a compiler failure mid-run: the eager layer is the same math
                self.failed = _reason(exc)
                logger.warning("compiled decoder layer failed (%s); this model runs the eager layer from now on",
                               self.failed)
        return layer_step(*args, **kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        checked = self._checked
        if checked is not None:
            form = _form(args)
            fn = self._unchecked.get(form)
            if fn is not None:
                key = (id(args[0]), form)
                held = checked.get(key)
                if held is None:
                    held = checked[key] = bool(fn.guard_check(*args, **kwargs))
                if held:
                    self.unchecked_calls += 1
                    return fn(*args, **kwargs)
        return self._compiled(*args, **kwargs)


def _form(args: tuple[Any, ...]) -> int:
    """The batch form of a layer call: 1 (one station) or 2 (several; its prompts' keys are (stations, H, S, d)),
    as PyTorch's compiler tells them apart (a size of 1 is compiled in, larger ones are not)."""
    return min(int(args[4].shape[0]), 2)


def compile_layer(parts: DecoderParts, dtype: torch.dtype, device: str, kv8: bool = False) -> CompiledLayer | None:
    """A compiled layer for this model, or None (with a warning saying why) where the compiler is missing, fails
    or disagrees with the eager layer on a probe: the model's first layer over a small random cache, one station
    and two (the two batch forms a CPU meets first, so that their compiles happen here, at load)."""
    start = time.monotonic()
    try:
        layer = CompiledLayer()
        for stations in (1, 2):
            error = _probe(layer, parts, stations, dtype, device, kv8)
            bound = 1e-3 if dtype == torch.float32 else 0.05
            if not error < bound:
                logger.warning("compiled decoder layer disagrees with the eager one (relative error %.3g over a "
                               "probe); keeping the eager layer", error)
                return None
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported op...: the eager layer it is
        logger.warning("cannot compile the decoder layer (%s); keeping the eager layer (engine.compile: never "
                       "says so quietly)", _reason(exc))
        return None
    logger.info("decoder layer compiled (%.1f s)", time.monotonic() - start)
    return layer


def _reason(exc: Exception) -> str:
    """An exception in one line: the compiler's messages run to pages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _probe_sizes(parts: DecoderParts) -> tuple[int, int]:
    """The probe's cache width and prompt length: sizes that no other input of the layer has (the model's widths,
    its layer count, the batch's rows). PyTorch's compiler assumes that inputs of equal sizes always will be
    ("duck sizing") and compiles that in: a probe whose 24 columns met musicgen-small's 24 layers (``uncond`` is
    a view of a (layers, width) tensor) compiled a form that the real steps failed, so the first chunk after load
    compiled again (12 s on 2 cores)."""
    taken = {1, 2, 4, parts.num_heads, parts.head_dim, parts.num_heads * parts.head_dim, *parts.uncond_cross.shape}
    columns = PROBE_COLUMNS
    while columns in taken:
        columns += 1
    prompt = PROBE_PROMPT
    while prompt in taken | {columns}:
        prompt += 1
    return columns, prompt


def _probe(layer: CompiledLayer, parts: DecoderParts, stations: int, dtype: torch.dtype, device: str,
           kv8: bool) -> float:
    """Run the first layer eagerly, compiled and (where :meth:`CompiledLayer.prepare` made it) compiled without
    the guards' check, over the same random inputs; the largest relative error of an output or cache write
    against the eager ones. The inputs are made as the decode loop makes them (the KV buffers and the prompts'
    mask outside inference mode, the step's tensors inside; the prompts' keys and values transposed), so that the
    first real steps find these compiles and make none, and pass the unchecked form's guards."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    H, d = parts.num_heads, parts.head_dim
    D = H * d
    rows = 2 * stations
    columns, prompt = _probe_sizes(parts)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    kc, vc = rand(rows, H, columns, d), rand(rows, H, columns, d)
    if kv8:  # an 8-bit cache (decoding.kv8_pack): the compiled layer dequantizes it in its attention
        kc, vc = kv8_pack(kc), kv8_pack(vc)
    caches = [(kc.clone(), vc.clone()) for _ in range(3)]
    cross_bias = torch.zeros(stations, prompt, dtype=dtype, device=device)[:, None, None, :]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        h, uncond = rand(rows, D), parts.uncond_cross[0]
        # laid out as step.cross_kv makes them: (n, S, H, d) seen as (n, H, S, d)
        xk, xv = (rand(stations, prompt, H, d).transpose(1, 2) for _ in range(2))
        column = columns // 2
        cols = torch.arange(columns, device=device)
        live = (cols <= column)[None, :].expand(rows, columns)
        self_bias = torch.where(live, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
        index = torch.arange(rows, device=device)
        at = (index, torch.full_like(index, column), self_bias, cross_bias, "halves",
              "native" if parts.native else "eager")
        layer.prepare(parts.layers[0], h, caches[2][0], caches[2][1], xk, xv, uncond, None, *at)
        runs, before = [layer_step, layer.probe], layer.unchecked_calls
        if stations in layer.forms():
            runs.append(layer)
        for run, (k, v) in zip(runs, caches):
            with layer.chunk():  # the layer itself: its unchecked form, once its guards hold for these inputs
                y = run(parts.layers[0], h, k, v, xk, xv, uncond, None, *at)
            written = k[:, :, column]
            out.append((y.float(), kv8_dequantize(written) if kv8 else written.float()))
    if len(runs) == 3 and layer.unchecked_calls == before:
        layer.drop(stations)  # its guards did not hold for the inputs it was made from: the checked path
    (want, want_k), *others = out
    return max(max(float((got - want).norm() / want.norm()), float((got_k - want_k).norm() / want_k.norm()))
               for got, got_k in others)
