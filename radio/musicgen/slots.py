"""The static decode path: stations in fixed KV slots, one captured decode step per frame for all of them.

What it owns (host side): which station holds which slot, each slot's delay-pattern bookkeeping (the columns
not yet turned into frames, the tail that recognises the station's context next time), when a slot is
(re)prefilled, and the CUDA graphs of :func:`~radio.musicgen.step.decode_step`, one per batch bucket.

A chunk: slots of stations that left are freed; each request keeps its slot if its codes still continue it,
else it is prefilled (a new station, a window reset, changed codes: all fresh rows of a chunk in ONE batched
prefill, written into their slots); prompts' cross-attention states are written into the slots; then the
step runs ``steps`` times on the device and the codes come back to the host once.

Slots are allocated for the window once (``capacity`` grows by doubling, up to what memory allows) and kept
while a station plays, so a steady batch allocates nothing. A slot never holds more than ``window`` tokens;
a station whose cache would outgrow it is reset, at most one per chunk unless it cannot wait.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .decoding import KV8_SCALE_BYTES, Row, fresh_row
from .pattern import DelayPattern
from .plan import plan_chunk
from ..errors import ModelError, SlotsFull
from . import fused
from .step import DecoderParts, SlotTensors, cross_kv, decode_step, finish_step

if TYPE_CHECKING:
    from .prefill import Prefill
    from .text import TextConditioning
    from .types import ContinuationRequest

logger = logging.getLogger(__name__)

# Batch sizes a step is captured for: a batch runs in the smallest bucket that holds its highest slot, so the
# steps between buckets are the rows computed for nothing (at most about 1/8 above 64).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, *range(72, 129, 8), *range(144, 257, 16), *range(288, 513, 32))
TEXT_TOKENS = 32  # prompt tokens a slot holds at first; grows (and graphs are recaptured) for longer prompts


def bucket(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


@dataclass
class SlotShape:
    layers: int
    heads: int
    head_dim: int
    codebooks: int
    vocab: int
    window: int  # tokens a slot holds at most (its columns: window + 1 scratch column)
    dtype: torch.dtype
    device: str
    kv8: bool = False  # the self-attention cache in 8 bits (decoding.kv8_pack): int8 numbers and a scale per row

    @property
    def kv_dim(self) -> int:
        """The cache's last dimension: head_dim, or head_dim + 4 (the scale's bytes) in 8 bits."""
        return self.head_dim + (KV8_SCALE_BYTES if self.kv8 else 0)

    def slot_bytes(self, text_tokens: int = TEXT_TOKENS) -> int:
        """Device memory of one slot: self-attention KV for two rows at the window, the prompt's cross KV."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        kv_row = self.kv_dim if self.kv8 else self.head_dim * size  # bytes per cached token and head
        per_layer = 2 * 2 * self.heads * (self.window + 1) * kv_row + 2 * self.heads * text_tokens * self.head_dim * size
        return self.layers * per_layer + self.codebooks * self.vocab * 4


class SlotDecoder:
    """Slots, their registers on the device, and the chunk loop around the captured step."""

    PREFILL_GROUP = 16  # stations per prefill pass: a mass start's transient attention memory stays bounded

    def __init__(self, parts: DecoderParts, shape: SlotShape, prefill: "Prefill", text: "TextConditioning",
                 pattern: DelayPattern, max_slots: int | None = None, graphs: bool | None = None) -> None:
        self.parts = parts
        self.pattern = pattern
        self.pad = prefill.pad
        self.shape = shape
        self.prefill = prefill
        self.text = text
        self.cuda = shape.device.startswith("cuda")
        self.graphs_enabled = self.cuda if graphs is None else graphs
        # How the step computes its layers (see decode_step): on CUDA our fused kernels where they run, else
        # PyTorch's fused attention; elsewhere transformers' math op for op.
        # (An 8-bit cache without the fused kernels runs the eager step: PyTorch's fused attention takes no int8.)
        self.kernels = ("fused" if fused.available(shape.device, shape.dtype, shape.heads, shape.head_dim, shape.kv8)
                        else "eager" if shape.kv8 else "sdpa") if self.cuda else "eager"
        self.keys: list[str | None] = []  # slot -> station key
        self.rows: dict[str, Row] = {}  # station key -> its row bookkeeping
        self.text_tokens = TEXT_TOKENS
        self.st: SlotTensors | None = None
        self.capacity = 0
        self.max_steps = 0
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}  # None: capture failed, eager
        self._pool: Any = None  # the graphs' memory pool handle
        self.max_slots = max_slots or self.slots_that_fit()
        self.generator = torch.Generator(device=shape.device)
        self.resets = 0
        self.spread_resets = True  # reset ahead of need, one per chunk, so resets never bunch up (bench: off)
        self.last_prefill_seconds = 0.0
        self.last_steps = 0
        self.last_batch: tuple[int, int] | None = None  # the last chunk's (bucket, top-k bound): its step
        self._stage = ""  # the part of a chunk running now (see _chunk)

    # -- memory ---------------------------------------------------------------------------------------------
    def slots_that_fit(self) -> int:
        """On CUDA: slots that fit in the free device memory (less a margin for activations and EnCodec);
        elsewhere: a generous bound, as host memory is the model pool's budget to keep."""
        if not self.cuda:
            return 512
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(torch.device(self.shape.device))
        usable = max(0, free - max(2 << 30, free // 10))  # never below what is held: slots are not taken back
        return max(1, min(BUCKETS[-1], self._held() + usable // self.shape.slot_bytes()))

    def _held(self) -> int:
        return self.capacity

    def nbytes(self) -> int:
        if self.st is None:
            return 0
        tensors = [*self.st.k, *self.st.v, *self.st.xk, *self.st.xv, self.st.noise, self.st.out]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_slot(self) -> int:
        return self.shape.slot_bytes(self.text_tokens)

    def bytes_per_station(self, stations: int) -> int:
        """What one station's decode state costs: its slot."""
        return self.bytes_per_slot()

    # -- allocation -----------------------------------------------------------------------------------------
    def _allocate(self, capacity: int, text_tokens: int, max_steps: int) -> None:
        """(Re)allocate every slot tensor, carrying the live slots over; captured graphs are dropped."""
        s = self.shape
        dev, dt = s.device, s.dtype
        H, d, K, W = s.heads, s.head_dim, s.codebooks, s.window + 1

        def alloc(shape: tuple[int, ...], dtype: torch.dtype = dt, fill: float | int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=dev)

        old = self.st
        kv_dtype = torch.int8 if s.kv8 else dt
        n = min(self.capacity, capacity)
        S = min(self.text_tokens, text_tokens)
        # Captured graphs point into the old tensors: drop them, and their memory pool with them (a pool whose
        # graphs are all gone is released; capturing into its stale handle is an allocator error).
        self._graphs.clear()
        self._pool = None

        def grow(tensors: list[torch.Tensor] | None, shape: tuple[int, ...], cut: Callable,
                 dtype: torch.dtype = dt) -> list[torch.Tensor]:
            # Layer by layer, each old buffer released as soon as it is copied: growing needs one layer's worth
            # of memory on top, not a second set of slots.
            out = []
            for layer in range(s.layers):
                t = alloc(shape, dtype)
                if tensors is not None:
                    cut(t)[:n] = cut(tensors[layer])[:n]
                    tensors[layer] = t  # the old one is freed here
                out.append(t)
            return out

        whole = lambda t: t  # noqa: E731
        text = lambda t: t[:, :, :S]  # noqa: E731
        new = SlotTensors(
            k=grow(old.k if old else None, (capacity, 2, H, W, s.kv_dim), whole, kv_dtype),
            v=grow(old.v if old else None, (capacity, 2, H, W, s.kv_dim), whole, kv_dtype),
            xk=grow(old.xk if old else None, (capacity, H, text_tokens, d), text),
            xv=grow(old.xv if old else None, (capacity, H, text_tokens, d), text),
            xbias=alloc((capacity, text_tokens), fill=torch.finfo(dt).min),
            length=alloc((capacity,), torch.long), next_col=alloc((capacity, K), torch.long),
            forced=alloc((capacity, K, K), torch.long, -1), warm=alloc((capacity,), torch.long, K),
            active=alloc((capacity,), torch.bool), guidance=alloc((capacity,), torch.float32, 1.0),
            temperature=alloc((capacity,), torch.float32, 1.0), top_k=alloc((capacity,), torch.long, 1),
            noise=alloc((capacity, K, s.vocab), torch.float32, 0.5), out=alloc((capacity, K, max_steps), torch.long),
            t=alloc((), torch.long),
        )
        if self.cuda:
            torch.cuda.empty_cache()  # the old slots' blocks: a later, larger allocation must not find them cut up
        if old is not None:
            new.xbias[:n, :S] = old.xbias[:n, :S]
            for name in ("length", "next_col", "forced", "warm", "guidance", "temperature", "top_k"):
                getattr(new, name)[:n] = getattr(old, name)[:n]
        self.st, self.capacity, self.text_tokens, self.max_steps = new, capacity, text_tokens, max_steps
        self.keys += [None] * (capacity - len(self.keys))

    @property
    def tensors(self) -> SlotTensors:
        """The allocated slot tensors (allocated by the first chunk's placement)."""
        if self.st is None:
            raise RuntimeError("decode slots used before any were allocated")
        return self.st

    def _slot_for(self, key: str) -> int | None:
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    def forget(self, key: str) -> None:
        """Free a station's slot (its memory is reused by the next station)."""
        i = self._slot_for(key)
        if i is not None:
            self.keys[i] = None
        self.rows.pop(key, None)

    # -- the chunk ------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence["ContinuationRequest"], keys: list[str], frames: int,
                 window: int) -> list[tuple[np.ndarray, bool]]:
        """``frames`` (or a few more) new frames for every request; returns (codes, was_fresh) per request."""
        window = min(window, self.shape.window)
        # Slots of stations this chunk does not ask for stay as they are (they may come back); a caller that
        # removes a station calls forget().
        continuing = {i: self._tokens(key) for i, (key, r) in enumerate(zip(keys, requests))
                      if key in self.rows and self.rows[key].continues(r.context)}
        plan = plan_chunk(len(requests), continuing, window, frames, self.pattern.max_delay, self.spread_resets)
        fresh, steps = list(plan.fresh), plan.steps
        self.last_steps = steps

        try:
            slots, out = self._chunk(requests, keys, fresh, steps, window)
        except torch.OutOfMemoryError as exc:
            self._shrink(exc)
            raise ModelError(f"out of device memory {self._stage}; now at most {self.max_slots} slots") from exc
        except SlotsFull:
            raise  # nothing was touched: the stations that fit go on with their caches
        except BaseException:
            # A chunk cut short (an interrupted prefill, steps that ran part-way): its slots' caches and registers
            # no longer match their stations' codes; the next chunk prefills them afresh.
            for key in keys:
                self.rows.pop(key, None)
            raise

        self.resets += len(plan.resets)
        results = []
        for i, (key, r) in enumerate(zip(keys, requests)):
            row = self.rows[key]
            row.steps += steps
            new = row.emit(out[slots[i]], r.context)
            results.append((new, i in fresh))
        return results

    def _chunk(self, requests: Sequence["ContinuationRequest"], keys: list[str], fresh: list[int], steps: int,
               window: int) -> tuple[list[int], np.ndarray]:
        """A chunk's device work: slots placed (grown if need be), fresh rows prefilled, prompts and sampling
        settings written, ``steps`` steps run. Returns each request's slot and the codes (slots, K, steps).
        ``_stage`` says which part runs (an out-of-memory error's message names it)."""
        self._stage = "placing the slots"
        slots = self._place(keys, fresh, steps)
        self.last_prefill_seconds = 0.0
        if fresh:
            self._stage = "in a prefill"
            t0 = time.monotonic()
            for i in range(0, len(fresh), self.PREFILL_GROUP):  # bounded transient attention memory
                part = fresh[i:i + self.PREFILL_GROUP]
                self._prefill_slots([requests[j] for j in part], [keys[j] for j in part], [slots[j] for j in part],
                                    window, steps)
            self.last_prefill_seconds = time.monotonic() - t0
        self._stage = "writing the prompts"
        self._write_prompts(requests, slots)
        dev = self.shape.device
        index = torch.tensor(slots, dtype=torch.long, device=dev)
        st = self.tensors  # (longer prompts reallocate the slots)
        st.active.zero_()
        st.active[index] = True
        st.guidance[index] = torch.tensor([r.sampling.guidance for r in requests], device=dev)
        st.temperature[index] = torch.tensor([r.sampling.temperature for r in requests], device=dev)
        st.top_k[index] = torch.tensor([max(1, min(r.sampling.top_k, self.shape.vocab)) for r in requests], device=dev)
        n = min(self.capacity, bucket(max(slots) + 1))
        kmax = max(max(1, min(r.sampling.top_k, self.shape.vocab)) for r in requests)
        # Rounded up, so few graphs are captured per bucket; never more than the vocabulary.
        kmax = min(self.shape.vocab, next((b for b in (1, 16, 64, 256, 1024) if b >= kmax), self.shape.vocab))
        st.t.zero_()
        self.last_batch = (n, kmax)
        self._stage = "during a decode step"
        for _ in range(steps):
            torch.rand(st.noise[:n].shape, generator=self.generator, device=dev, out=st.noise[:n])
            self._run_step(n, kmax)
        return slots, st.out[:n, :, :steps].cpu().numpy().copy()  # the one trip back to the host (a copy on CPU too)

    def _tokens(self, key: str) -> int:
        row = self.rows[key]
        return row.context_frames + row.steps

    def _place(self, keys: list[str], fresh: list[int], steps: int) -> list[int]:
        """A slot for every request (existing slots kept, new ones lowest-first), capacity grown as needed."""
        slots = [self._slot_for(k) for k in keys]
        need = sum(1 for s in slots if s is None)
        free = [i for i, k in enumerate(self.keys) if k is None]
        used = len(self.keys) - len(free)
        if used + need > self.max_slots:
            missing = [k for k, s in zip(keys, slots) if s is None]
            raise SlotsFull(missing[max(0, self.max_slots - used):], self.max_slots)
        if need > len(free) or self.st is None or steps > self.max_steps:
            capacity = min(self.max_slots, max(self.capacity, bucket(used + need)))
            self._allocate(capacity, self.text_tokens, max(self.max_steps, steps, 256))
            free = [i for i, k in enumerate(self.keys) if k is None]
        placed = []
        for key, slot in zip(keys, slots):
            if slot is None:
                slot = free.pop(0)
                self.keys[slot] = key
            placed.append(slot)
        return placed

    def _prefill_slots(self, requests: list, keys: list[str], slots: list[int], window: int, steps: int) -> None:
        """ONE batched prefill of the fresh rows' contexts (transformers' decoder), copied into their slots."""
        st = self.tensors
        pad = self.pad
        rows, contexts = [], []
        for key, r in zip(keys, requests):
            row, ctx = fresh_row(key, r.context, window, steps, pad, self.pattern)
            contexts.append(ctx)
            rows.append(row)
            self.rows[key] = row
        kv, P, offsets = self.prefill(rows, contexts, requests, True)
        B = len(rows)
        dev = self.shape.device
        if kv is not None:
            # One copy per layer for all fresh slots of a context length (a chunk's resets share one), both
            # halves at once: transformers' rows are [cond x B, uncond x B], a slot's are (cond, uncond).
            by_length: dict[int, list[int]] = {}
            for j, row in enumerate(rows):
                if row.context_frames:
                    by_length.setdefault(row.context_frames, []).append(j)
            for T, js in by_length.items():
                src = torch.tensor(js, device=dev)
                dst = torch.tensor([slots[j] for j in js], device=dev)
                for layer, (keys_l, values_l) in enumerate(kv):
                    for cache, new in ((st.k[layer], keys_l), (st.v[layer], values_l)):
                        both = new.view(2, B, *new.shape[1:])[:, src, :, P - T:].transpose(0, 1)
                        cache[dst, :, :, :T] = both.to(cache.dtype)
        index = torch.tensor(slots, device=dev)
        st.length[index] = torch.tensor([row.context_frames for row in rows], device=dev)
        st.next_col[index] = torch.from_numpy(np.stack([row.next_column for row in rows])).to(dev)
        st.forced[index] = torch.from_numpy(np.stack([row.forced for row in rows])).to(dev)
        st.warm[index] = 0

    def _write_prompts(self, requests: Sequence, slots: list[int]) -> None:
        """The prompts' cross-attention keys and values into their slots (every chunk: a blend moves them)."""
        states = [self.text.conditioning(r) for r in requests]
        S = max(s.shape[0] for s in states)
        if S > self.text_tokens:
            grown = self.text_tokens
            while grown < S:
                grown *= 2
            self._allocate(self.capacity, grown, self.max_steps)
        st = self.tensors
        dev, D = self.shape.device, states[0].shape[1]
        enc = torch.zeros((len(states), self.text_tokens, D), dtype=states[0].dtype, device=dev)
        bias = torch.full((len(states), self.text_tokens), torch.finfo(self.shape.dtype).min, dtype=self.shape.dtype,
                          device=dev)
        for i, s in enumerate(states):
            enc[i, : s.shape[0]] = s
            bias[i, : s.shape[0]] = 0
        index = torch.tensor(slots, dtype=torch.long, device=dev)
        with torch.inference_mode():
            for layer in range(self.shape.layers):
                keys, values = cross_kv(self.parts, layer, enc)
                st.xk[layer].index_copy_(0, index, keys.to(self.shape.dtype))
                st.xv[layer].index_copy_(0, index, values.to(self.shape.dtype))
        st.xbias.index_copy_(0, index, bias)

    def _shrink(self, exc: BaseException) -> None:
        """After an out-of-memory error: drop the graphs and their pool, return cached memory, and take no more
        stations than hold slots now (less one), so the next chunks fit; the caller's stations wait on filler.
        The interrupted chunk is void: every slot is prefilled afresh from its station's codes."""
        used = sum(1 for k in self.keys if k is not None)
        self.max_slots = max(1, min(self.max_slots, used - 1))
        # Every slot is released (a growth cut short leaves some layers' buffers at the new size and some at
        # the old); the next chunk allocates what it needs afresh.
        self._graphs.clear()
        self._pool = None
        self.st, self.capacity, self.keys = None, 0, []
        self.rows.clear()
        if self.cuda:
            torch.cuda.empty_cache()
        logger.error("out of device memory (%s); slots limited to %d", str(exc).splitlines()[0][:120], self.max_slots)

    # -- the step -------------------------------------------------------------------------------------------
    def _run_step(self, n: int, kmax: int) -> None:
        st = self.tensors
        run = lambda: decode_step(self.parts, st, n, kmax, self.kernels)  # noqa: E731
        if not self.graphs_enabled:
            with torch.inference_mode():
                run()
            return
        if (n, kmax) not in self._graphs:
            try:
                self._graphs[(n, kmax)] = self._capture(run)
            except RuntimeError as exc:  # a capture that fails must cost speed, never the station
                logger.warning("could not capture the decode step for %d slots (%s); running it eagerly", n, exc)
                self._graphs[(n, kmax)] = None
                self._pool = None
        graph = self._graphs[(n, kmax)]
        if graph is None:
            with torch.inference_mode():
                run()
            return
        graph.replay()

    REGISTERS = ("length", "next_col", "warm", "t")  # what a step advances (besides cache columns past them)

    def anatomy(self, repeats: int = 20) -> dict[str, float] | None:
        """Where the last chunk's step spends its time, in seconds per step (for ``radio bench``): ``step``, the
        whole step as the chunk loop runs it (a graph replay on CUDA); ``sampling``, its heads, guidance,
        sampling, forcing and writes, run the same way on fixed hidden states (so ``step - sampling`` is the
        embeddings and layers); ``noise``, the draw before each step. The slots' registers are restored and the
        decoder's generator is not drawn from: the next chunk is what it would have been. None before a chunk."""
        if self.last_batch is None or self.st is None:
            return None
        n, kmax = self.last_batch
        st = self.st
        # Each step writes its slots' next cache column and column t of the chunk's codes: both must stay inside
        # (the last cache column is the scratch one of slots sitting out).
        room = self.shape.window - 1 - int(torch.where(st.active, st.length, 0).max())
        repeats = min(repeats, self.max_steps - 2, room - 2)
        if repeats < 1:
            return None
        h = torch.zeros((2 * n, self.shape.heads * self.shape.head_dim), dtype=self.shape.dtype,
                        device=self.shape.device)
        tail = lambda: finish_step(self.parts, st, n, kmax, h)  # noqa: E731
        tail_graph = self._capture(tail) if self.graphs_enabled and self._graphs.get((n, kmax)) else None
        noise = torch.Generator(device=self.shape.device).manual_seed(0)

        def clock(run: Callable[[], object]) -> float:
            st.t.zero_()
            run()  # warm-up (a first replay, a first eager call)
            self._sync()
            t0 = time.monotonic()
            for _ in range(repeats):
                run()
            self._sync()
            return (time.monotonic() - t0) / repeats

        def eager_tail() -> None:
            with torch.inference_mode():
                tail()

        with self._registers_kept():
            return {"step": clock(lambda: self._run_step(n, kmax)),
                    "sampling": clock(tail_graph.replay if tail_graph is not None else eager_tail),
                    "noise": clock(lambda: torch.rand(st.noise[:n].shape, generator=noise, device=st.noise.device,
                                                      out=st.noise[:n]))}

    @contextmanager
    def _registers_kept(self) -> Iterator[None]:
        """Steps run inside leave the slots' registers as they were (the cache columns they wrote lie past every
        slot's length, where the next step writes before it reads)."""
        st = self.tensors
        saved = [getattr(st, name).clone() for name in self.REGISTERS]
        try:
            yield
        finally:
            for name, value in zip(self.REGISTERS, saved):
                getattr(st, name).copy_(value)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _capture(self, run: Callable[[], None]) -> "torch.cuda.CUDAGraph":
        """Warm the step up on a side stream (its side effects undone), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with self._registers_kept():
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            run()
        logger.debug("captured the decode step for %d slots", self.capacity)
        return graph

