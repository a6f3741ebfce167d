"""The dynamic path's chunk loop (the CPU's): rows placed by THE chunk plan, their KV in chunk-sized buffers
(:class:`.decoding.DecodeState`), then the chunk's decode steps (:func:`.step.row_logits`, the same layers as
the slot path's step) and :mod:`.sampling`.

A chunk: rows of stations this chunk leaves out are parked; the plan (:func:`.plan.plan_chunk`) says which rows
continue and which are prefilled (:class:`.prefill.Prefill`); the buffers are rebuilt to hold the kept and
fresh rows with room for the chunk's steps; each step feeds every row's next column, samples the next and,
during a fresh row's warm-up, forces the codebooks the delay pattern still takes from its context.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

from .decoding import DecodeState, fresh_row
from .pattern import DelayPattern
from .plan import ChunkPlan, plan_chunk
from .prefill import Prefill
from .sampling import guide, sample
from .step import DecoderParts, LayerFn, RowCross, row_logits
from .text import TextConditioning
from .types import ANON, ContinuationRequest

logger = logging.getLogger(__name__)


class DynamicDecoder:
    """Rows in chunk-sized contiguous KV buffers, every row of the batch stepped together."""

    BATCH_LIMIT = 16  # on a CPU a step's cost grows with every row: more only delay everyone's next chunk

    def __init__(self, parts: DecoderParts, prefill: Prefill, text: TextConditioning, state: DecodeState,
                 pattern: DelayPattern, vocab: int, device: str, layer: LayerFn | None = None) -> None:
        self.parts = parts
        self.layer = layer  # one decoder layer: step.layer_step, or a compiled copy (compiled.compile_layer)
        self.prefill = prefill
        self.text = text
        self.state = state
        self.pattern = pattern
        self.vocab = vocab
        self.device = device
        self.generator = torch.Generator(device=device)
        self.resets = 0
        self.spread_resets = True  # window resets one per chunk, ahead of need (see plan.resets_due)
        self.last_steps = 0
        self.last_prefill_seconds = 0.0
        self.max_slots = self.BATCH_LIMIT

    def nbytes(self) -> int:
        return self.state.nbytes()

    def bytes_per_station(self, stations: int) -> int:
        return self.state.nbytes() // max(1, stations)

    def forget(self, key: str) -> None:
        self.state.forget(key)

    def generate(self, requests: Sequence[ContinuationRequest], keys: list[str], frames: int,
                 window: int) -> list[tuple[np.ndarray, bool]]:
        """``frames`` (or more) new frames for every request; returns (codes, was_fresh) per request. Rows are
        placed (kept, brought back from parking, or prefilled), the buffers assembled for the chunk, then the
        chunk's steps run. A chunk cut short leaves no live row behind (their caches would not match)."""
        try:
            return self._generate(requests, keys, frames, window)
        except BaseException:
            self.state.drop_live()
            raise

    def _generate(self, requests: Sequence[ContinuationRequest], keys: list[str], frames: int,
                  window: int) -> list[tuple[np.ndarray, bool]]:
        state = self.state
        use_cfg = any(r.sampling.guidance > 1.0 for r in requests)
        plan, keep_idx = self._place_rows(keys, requests, frames, window, use_cfg)
        steps = plan.steps
        self.last_steps = steps
        kept_keys = {state.rows[j].key for j in keep_idx}
        fresh = [fresh_row(keys[i], requests[i].context, window, steps, self.prefill.pad, self.pattern)
                 for i in plan.fresh]
        self.last_prefill_seconds = 0.0
        if fresh or len(keep_idx) != len(state.rows):
            t0 = time.monotonic()
            kv, length, offsets = self.prefill([row for row, _ in fresh], [ctx for _, ctx in fresh],
                                               [requests[i] for i in plan.fresh], use_cfg)
            self.last_prefill_seconds = time.monotonic() - t0
            state.assemble(keep_idx, [row for row, _ in fresh], kv, length, offsets, use_cfg, steps)
        else:
            state.fit(steps)
        order = {row.key: n for n, row in enumerate(state.rows)}
        row_requests = [requests[i] for i in sorted(range(len(requests)), key=lambda i: order[keys[i]])]
        out = self._steps(row_requests, use_cfg, steps)
        results: dict[str, tuple[np.ndarray, bool]] = {}
        for b, row in enumerate(state.rows):
            results[row.key] = (row.emit(out[b], row_requests[b].context), row.key not in kept_keys)
        return [results[k] for k in keys]

    def _place_rows(self, keys: list[str], requests: Sequence[ContinuationRequest], frames: int, window: int,
                    use_cfg: bool) -> tuple[ChunkPlan, list[int]]:
        """The chunk's plan for this layout, and the rows of the state the plan keeps (indices into its rows,
        in the plan's order). A row continues when it holds its station's codes in the chunk's guidance layout.
        Rows this chunk leaves out are parked with their caches; parked rows asked for again come back as they
        were if they still continue their station's codes."""
        state = self.state
        state.max_columns = window + self.pattern.num_codebooks  # kept rows stay within the window (+ warm-up)
        state.park({k for k in state.row_keys() if k not in keys and not k.startswith(ANON)})
        back = []
        for key, r in zip(keys, requests):
            parked = state.parked.get(key)
            if parked is None:
                continue
            if parked.cfg == use_cfg and (not state.rows or state.cfg == use_cfg) and state.matches(parked.row,
                                                                                                     r.context):
                back.append(key)
            else:
                del state.parked[key]
        state.unpark(back, room=frames + self.pattern.max_delay)  # the chunk's steps, with a fresh row's warm-up
        existing = {row.key: i for i, row in enumerate(state.rows)}
        row_of: dict[int, int] = {}
        for i, (key, r) in enumerate(zip(keys, requests)):
            j = existing.get(key)
            if j is not None and state.cfg == use_cfg and state.matches(state.rows[j], r.context):
                row_of[i] = j
        plan = plan_chunk(len(requests), {i: state.tokens(j) for i, j in row_of.items()}, window, frames,
                          self.pattern.max_delay, self.spread_resets)
        for i in plan.resets:
            self.resets += 1
            logger.debug("window reset for %s after %d frames", keys[i], state.tokens(row_of[i]))
        return plan, [row_of[i] for i in plan.keep]

    def _steps(self, row_requests: Sequence[ContinuationRequest], use_cfg: bool, steps: int) -> np.ndarray:
        """The chunk's decode steps over the assembled rows: returns the sampled columns, (rows, K, steps)."""
        dev = self.device
        state = self.state
        K = self.pattern.num_codebooks
        B = len(state.rows)
        guidance = torch.tensor([r.sampling.guidance for r in row_requests], dtype=torch.float32, device=dev)
        temperature = torch.tensor([r.sampling.temperature for r in row_requests], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(1, min(r.sampling.top_k, self.vocab)) for r in row_requests], device=dev)
        kmax = int(top_k.max())
        enc, enc_mask = self.text.batch(row_requests, False)
        prompts = RowCross.of(self.parts, enc, enc_mask)
        offsets = state.offsets.to(dev)
        kv = list(zip(state.k_bufs, state.v_bufs))
        state.scratch.clear()  # the buffers were sized for this chunk: the last chunk's upcast buffers are stale
        next_cols = np.stack([row.next_column for row in state.rows])
        out = np.empty((B, K, steps), dtype=np.int64)
        steady = getattr(self.layer, "chunk", None)  # a compiled layer checks its guards once per chunk
        with torch.inference_mode(), (steady() if steady is not None else nullcontext()):
            for j in range(steps):
                logits = row_logits(self.parts, kv, torch.from_numpy(next_cols).to(dev), offsets, state.length,
                                    prompts, use_cfg, state.scratch, self.layer)
                state.length += 1
                logits = guide(logits[:B], logits[B:] if use_cfg else None, guidance)
                noise = torch.rand(logits.shape, generator=self.generator, device=logits.device)
                sampled = sample(logits, temperature, top_k, noise, kmax).cpu().numpy()
                for b, row in enumerate(state.rows):
                    if row.steps < self.pattern.max_delay:  # warm-up: codebooks still in the context
                        f = row.forced[:, row.steps]
                        sampled[b] = np.where(f >= 0, f, sampled[b])
                    row.steps += 1
                out[:, :, j] = sampled
                next_cols = sampled
        return out

    def teacher_forced_logits(self, request: ContinuationRequest, codes: np.ndarray) -> torch.Tensor:
        """The conditional rows' logits (steps, K, V) of the decode steps that feed ``codes`` (K, n), the frames
        after ``request.context``, one step at a time on this path's KV format: what ``radio bench --quality``
        and the tests hold an 8-bit cache to against the full one. Uses its own buffers; the rows are untouched."""
        pad, K = self.prefill.pad, self.pattern.num_codebooks
        context = np.asarray(request.context, dtype=np.int64)
        T, n = context.shape[1], codes.shape[1]
        row, ctx = fresh_row("\0quality", context, T + n + K + 1, n, pad, self.pattern)
        kv, P, _ = self.prefill([row], [ctx], [request], True)
        if kv is None:
            raise ValueError("teacher-forced logits need a context of at least one frame")
        both = np.concatenate([context, codes], axis=1)
        columns = torch.from_numpy(self.pattern.columns(both, T + n, pad)).to(self.device)  # (K, T + n)
        state = self.state
        bufs = []
        for pair in kv:
            held = []
            for new in pair:
                buf = torch.zeros((2, state.heads, P + n, state.head_dim), dtype=state.dtype, device=self.device)
                buf[:, :, :P] = new.to(state.dtype)
                held.append(buf)
            bufs.append((held[0], held[1]))
        enc, mask = self.text.batch([request], False)
        prompts = RowCross.of(self.parts, enc, mask)
        offsets = torch.zeros(1, dtype=torch.long, device=self.device)
        out = []
        with torch.inference_mode():
            for j in range(n):
                logits = row_logits(self.parts, bufs, columns[:, T + j][None], offsets, P + j, prompts, True, {},
                                    self.layer)
                out.append(logits[0])
        return torch.stack(out)
