"""The dynamic KV layout: the rows and chunk-sized buffers :class:`.dynamic.DynamicDecoder` steps over.

Every station is a *row*. A row keeps its self-attention KV cache alive across chunks, so a steady-state
chunk costs exactly one decoder step per new frame: no re-prefill of the context, no repeated steps.

Layout. All rows share one KV buffer per layer, shape ``(physical_rows, heads, capacity, head_dim)``,
preallocated so a step writes in place (transformers' DynamicCache concatenates, copying the whole cache
every step), sized to the chunk: a step's attention reads the whole buffer (a slice of a longer one is not
contiguous, and CPU matmuls copy such an operand on every call), so few columns past the rows' tokens are read.
Rows are right-aligned: row i's tokens occupy columns ``[offset[i], length)``; columns before
``offset[i]`` are masked padding. Position ids are per row (column - offset), so a row always sees its
own BOS at position 0, whatever its neighbours do. With classifier-free guidance, physical row ``i + B`` is
the unconditional twin of row ``i``.

Delay pattern (``pattern.DelayPattern``). MusicGen predicts codebook k of frame f at column f + 1 + delay[k]
(column 0 is BOS). A row is *fresh* after a prefill of its context (T frames = columns 0..T-1 in the cache;
column T is fed by the first step). Its first ``max_delay`` steps produce columns in which the delayed codebooks
still belong to the known context: those are *forced* from the context instead of sampled. A fresh row
therefore yields its first frame after max_delay + 1 steps; afterwards every step completes one frame.

Parking. A row its station leaves out of a chunk is moved out of the buffers with its KV cache and comes back
unchanged when asked for again (if the station's codes still continue it), so sitting a chunk out costs a copy,
not a prefill.

Window. MusicGen was trained on 30 s windows. When a row's cache would outgrow ``window`` frames, the row is
reset: re-prefilled from its last ``context_seconds`` of codes. Resets are spread out, one row per chunk, so a
batch never stalls on several prefills at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .pattern import DelayPattern

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One station's decode state."""

    key: str
    context_frames: int  # T at the last prefill
    next_column: np.ndarray  # (K,) the column the next step feeds
    forced: np.ndarray  # (K, K): forced[k, j] = value of codebook k at warm-up step j, or -1 (sample)
    pattern: DelayPattern  # the model's delay pattern (mono or stereo)
    steps: int = 0  # steps since the last prefill
    columns: list[np.ndarray] = field(default_factory=list)  # generated columns not yet fully turned into frames
    tail: np.ndarray | None = None  # last emitted frames, to recognise the station's context next time

    def emit(self, sampled: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Take a chunk's sampled columns (K, steps) and return the frames they complete (K, n)
        (:meth:`DelayPattern.frames`). The columns of frames still incomplete are kept for the next chunk;
        ``tail`` remembers what the station now has."""
        self.next_column = sampled[:, -1].copy()
        self.columns.extend(sampled[:, j] for j in range(sampled.shape[1]))
        new, self.columns = self.pattern.frames(self.columns)
        self.tail = np.concatenate([np.asarray(context, dtype=np.int64), new], axis=1)[:, -4:]
        return new

    def continues(self, context: np.ndarray) -> bool:
        """Is ``context`` (what the station says it has) the continuation of what this row produced?"""
        if self.tail is None:
            return False
        n = min(self.tail.shape[1], context.shape[1])
        return n > 0 and np.array_equal(self.tail[:, -n:], context[:, -n:])


def fresh_row(key: str, context: np.ndarray, window: int, steps: int, pad: int,
              pattern: DelayPattern) -> tuple[Row, np.ndarray]:
    """A row to prefill from a station's codes: the context cut so the row and this chunk's ``steps`` fit the
    window, with its first column and its warm-up forcing. Returns the row and the cut context."""
    ctx = np.asarray(context, dtype=np.int64)
    ctx = ctx[:, max(0, ctx.shape[1] - max(0, window - steps - 1)):]
    T = ctx.shape[1]
    return Row(key=key, context_frames=T, next_column=pattern.column(ctx, T, pad), forced=pattern.warmup(ctx, pad),
               pattern=pattern), ctx


MAX_PARKED = 64
KV8_SCALE_BYTES = 4  # an 8-bit key or value row ends with its float32 scale, as 4 int8 bytes


def kv8_pack(x: torch.Tensor) -> torch.Tensor:
    """Keys or values (..., d) as 8 bits: each row of d numbers (one token of one head) scaled by its own absolute
    maximum to int8, its float32 scale stored in the 4 bytes after it: (..., d + 4) int8. One tensor, so the
    buffers' copies (assemble, park) move values and scales together."""
    scale = (x.abs().amax(-1, keepdim=True).float() / 127.0).clamp(min=1e-12)
    q = torch.floor(x.float() / scale + 0.5).clamp(-127, 127).to(torch.int8)  # half up, as the Triton kernel
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def kv8_dequantize(packed: torch.Tensor) -> torch.Tensor:
    """:func:`kv8_pack`'s rows back as float32 (..., d)."""
    numbers, scales = kv8_unpack(packed)
    return numbers.float() * scales


def kv8_unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 numbers (..., d) and float32 scales (..., 1) of :func:`kv8_pack`'s rows (views, no copies)."""
    d = packed.shape[-1] - KV8_SCALE_BYTES
    return packed[..., :d], packed[..., d:].view(torch.float32)


def _storage(t: torch.Tensor) -> torch.Tensor:
    """The tensor a buffer is a view of (the buffer itself if it is not a view)."""
    return t._base if t._base is not None else t


@dataclass
class Parked:
    """A row taken out of the batch with its KV cache: per layer (keys, values), shape (1 or 2, H, tokens, d)."""

    row: Row
    cfg: bool
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def tokens(self) -> int:
        return int(self.kv[0][0].shape[2]) if self.kv else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


class DecodeState:
    """Rows, their shared KV buffers, and the bookkeeping to add, drop, park and reset rows."""

    def __init__(self, num_layers: int, heads: int, head_dim: int, num_codebooks: int, pad: int, dtype: torch.dtype,
                 device: str, kv8: bool = False) -> None:
        self.num_layers = num_layers
        self.heads = heads
        self.kv8 = kv8  # the buffers hold kv8_pack()ed keys and values: int8, head_dim + KV8_SCALE_BYTES columns
        self.head_dim = head_dim + (KV8_SCALE_BYTES if kv8 else 0)
        if kv8:
            dtype = torch.int8
        self.scratch: dict[str, torch.Tensor] = {}  # an 8-bit cache's upcast buffers (step._attend8)
        self.K = num_codebooks
        self.pad = pad
        self.dtype = dtype
        self.device = device
        self.rows: list[Row] = []
        self.cfg = False
        self.length = 0
        self.capacity = 0
        self.offsets = torch.zeros(0, dtype=torch.long)
        self.k_bufs: list[torch.Tensor] = []
        self.v_bufs: list[torch.Tensor] = []
        self.parked: dict[str, Parked] = {}  # rows sitting chunks out, by key
        # Storage of the buffers the last rebuild replaced, reused by the next one. A rebuild happens every chunk
        # (the buffers are sized to it), and freshly allocated buffers this large are new pages from the OS:
        # faulting them in cost several times the copy itself (measured: 13 ms vs 2.4 ms for a 36 MB buffer).
        self.spare: list[torch.Tensor] = []
        self.max_columns = 0  # the most columns a buffer is expected to need (the window and a chunk)

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def physical(self) -> int:
        return len(self.rows) * (2 if self.cfg else 1)

    def tokens(self, i: int) -> int:
        """Tokens in row i's cache (its window so far)."""
        return self.length - int(self.offsets[i])

    def physical_offsets(self) -> torch.Tensor:
        return torch.cat([self.offsets, self.offsets]) if self.cfg else self.offsets

    @staticmethod
    def matches(row: Row, context: np.ndarray) -> bool:
        """Is ``context`` (what the station says it has) the continuation of what this row produced?"""
        return row.continues(context)

    # -- rebuilding ---------------------------------------------------------------------------------------------
    def assemble(self, keep: list[int], fresh: list[Row], fresh_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 fresh_len: int, fresh_offsets: list[int], cfg: bool, room: int) -> None:
        """New buffers holding rows ``keep`` (indices into the current rows) followed by ``fresh`` rows, with
        ``room`` free columns after them (attention reads the whole buffer: size it to the coming chunk).

        ``fresh_kv``: per layer (keys, values) of the fresh rows' prefill, shape (phys_fresh, H, fresh_len, d),
        right-aligned with ``fresh_offsets``. Kept rows are compacted: columns no kept row uses are dropped.
        """
        old_rows, old_cfg, old_len = self.rows, self.cfg, self.length
        if keep and old_cfg != cfg:
            raise ValueError("cannot keep rows across a change of guidance layout")
        start = min((int(self.offsets[i]) for i in keep), default=old_len)
        kept_len = old_len - start
        new_len = max(kept_len, fresh_len)
        capacity = new_len + room
        B_keep, B_fresh = len(keep), len(fresh)
        B = B_keep + B_fresh
        mult = 2 if cfg else 1
        old_B = len(old_rows)

        # Physical layout: [kept rows, fresh rows], then (guidance) their unconditional twins in the same order.
        # Every column is written once: copied from the old buffers or the prefill, or zeroed (padding and the
        # free room are masked, but attention reads them, so they must be finite).
        gather = None if keep == list(range(old_B)) else torch.tensor(keep, dtype=torch.long, device=self.device)
        pad_keep, pad_fresh = new_len - kept_len, new_len - fresh_len
        k_bufs, v_bufs = [], []
        shape = (B * mult, self.heads, capacity, self.head_dim)
        for layer in range(self.num_layers):
            kb, vb = self._buffer(shape), self._buffer(shape)
            for which, buf in enumerate((kb, vb)):
                buf[:, :, new_len:].zero_()
                for half in range(mult):  # 0: conditional rows, 1: their unconditional twins
                    if B_keep:
                        dst = buf[half * B:half * B + B_keep]
                        dst[:, :, :pad_keep].zero_()
                        if kept_len:
                            old = (self.k_bufs if which == 0 else self.v_bufs)[layer]
                            old = old[half * old_B:(half + 1) * old_B, :, start:old_len]
                            dst[:, :, pad_keep:new_len] = old if gather is None else old.index_select(0, gather)
                    if B_fresh:
                        dst = buf[half * B + B_keep:(half + 1) * B]
                        dst[:, :, :pad_fresh].zero_()
                        if fresh_kv is not None and fresh_len:
                            src = fresh_kv[layer][which][half * B_fresh:(half + 1) * B_fresh]
                            dst[:, :, pad_fresh:new_len] = src.to(self.dtype)
                        else:
                            dst[:, :, pad_fresh:new_len].zero_()
            k_bufs.append(kb)
            v_bufs.append(vb)
        offsets = [int(self.offsets[i]) - start + (new_len - kept_len) for i in keep]
        offsets += [o + (new_len - fresh_len) for o in fresh_offsets]
        self.rows = [old_rows[i] for i in keep] + list(fresh)
        self.cfg = cfg
        self.length = new_len
        self.capacity = capacity
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        # The replaced buffers are the next rebuild's spares (those this one did not take are freed); none are
        # kept for an empty batch.
        self.spare = [_storage(t) for t in (*self.k_bufs, *self.v_bufs)] if B else []
        self.k_bufs, self.v_bufs = k_bufs, v_bufs

    def _buffer(self, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """An uninitialised buffer of ``shape``: a view of a spare storage that fits, else of a new one sized for
        ``max_columns`` (a row's cache grows every chunk up to the window; only the pages used are ever touched).
        """
        rows, heads, columns, dim = shape
        numel = rows * heads * columns * dim
        target = max(numel + numel // 4, rows * heads * self.max_columns * dim)
        fits = [i for i, t in enumerate(self.spare)
                if numel <= t.numel() <= max(target, 2 * numel) and t.dtype == self.dtype]
        if fits:
            flat = self.spare.pop(min(fits, key=lambda i: self.spare[i].numel()))
        else:
            flat = torch.empty(target, dtype=self.dtype, device=self.device)
        return flat.view(-1)[:numel].view(shape)

    def fit(self, steps: int) -> None:
        """Size the buffers to ``steps`` more columns (dropping columns no row uses): attention reads the whole
        buffer, so spare capacity would be read on every step. One copy per chunk; a buffer already sized for
        this chunk with fewer than K spare columns (a rejoin sized for warm-up steps) is kept as it is."""
        start = min((int(o) for o in self.offsets), default=self.length)
        spare = self.capacity - (self.length + steps)
        if start == 0 and 0 <= spare < self.K:  # reading a few spare columns costs less than a copy
            return
        self.assemble(list(range(len(self.rows))), [], None, 0, [], self.cfg, steps)

    def row_keys(self) -> list[str]:
        return [row.key for row in self.rows]

    # -- parking ------------------------------------------------------------------------------------------------
    def park(self, keys: set[str]) -> None:
        """Copy the KV caches of the rows of ``keys`` out of the batch, so a chunk they sit out (a station with a
        full buffer, or a new station's solo first chunk) does not cost them a re-prefill. The rows themselves
        leave the buffers at the chunk's own rebuild (``unpark``, ``assemble``): one copy of the others, not two.
        """
        B = len(self.rows)
        for i, row in enumerate(self.rows):
            if row.key not in keys:
                continue
            off = int(self.offsets[i])
            phys = [i, i + B] if self.cfg else [i]
            kv = [(k[phys, :, off:self.length].clone(), v[phys, :, off:self.length].clone())
                  for k, v in zip(self.k_bufs, self.v_bufs)]
            self.parked[row.key] = Parked(row, self.cfg, kv)
        while len(self.parked) > MAX_PARKED:  # keys that never came back (a caller that does not forget)
            self.parked.pop(next(iter(self.parked)))

    def unpark(self, keys: list[str], room: int = 0) -> None:
        """Put parked rows back after the live ones, exactly as they were (same guidance layout required); rows
        parked since the last rebuild leave the buffers in the same pass. ``room``: free columns for the coming
        chunk (so it need not rebuild again)."""
        back = [self.parked.pop(k) for k in keys]
        if not back:
            return
        cfg = back[0].cfg
        if any(p.cfg != cfg for p in back) or (self.rows and self.cfg != cfg):
            raise ValueError("cannot unpark rows across a change of guidance layout")
        n = max(p.tokens for p in back)
        mult = 2 if cfg else 1
        kv = []
        for layer in range(self.num_layers):
            pair = []
            for which in range(2):
                buf = torch.zeros((len(back) * mult, self.heads, n, self.head_dim), dtype=self.dtype,
                                  device=self.device)
                for j, p in enumerate(back):
                    for half in range(mult):  # fresh rows' layout: all conditional rows, then their twins
                        buf[half * len(back) + j, :, n - p.tokens:] = p.kv[layer][which][half]
                pair.append(buf)
            kv.append((pair[0], pair[1]))
        live = [i for i, row in enumerate(self.rows) if row.key not in self.parked and row.key not in keys]
        self.assemble(live, [p.row for p in back], kv, n, [n - p.tokens for p in back], cfg, room)

    def drop_live(self) -> None:
        """Drop every live row and the buffers, as before the first chunk (after a chunk cut short, their contents
        are unknown); parked rows keep their own caches."""
        self.rows = []
        self.length = self.capacity = 0
        self.offsets = torch.zeros(0, dtype=torch.long)
        self.k_bufs, self.v_bufs = [], []

    def forget(self, key: str) -> None:
        """Drop a row (live or parked) and its cache."""
        self.parked.pop(key, None)
        keep = [i for i, row in enumerate(self.rows) if row.key != key]
        if len(keep) != len(self.rows):
            self.assemble(keep, [], None, 0, [], self.cfg, 0)  # the next chunk sizes the buffers

    def nbytes(self) -> int:
        """Bytes reserved: the buffers' storage (with room to grow), the spare set, parked caches. Pages of the
        room not yet written are not resident."""
        held = [_storage(t) for t in (*self.k_bufs, *self.v_bufs)] + self.spare
        return sum(t.numel() * t.element_size() for t in held) + sum(p.nbytes() for p in self.parked.values())
