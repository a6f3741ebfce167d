"""The decode state's buffer rebuild: rows kept, dropped and added, with their guidance twins, column for column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radio.musicgen.decoding import DecodeState, Row
from radio.musicgen.pattern import DelayPattern


def _row(key: str) -> Row:
    return Row(key=key, context_frames=0, next_column=np.zeros(4, np.int64), forced=np.full((4, 4), -1),
               pattern=DelayPattern(4))


def _state(cfg: bool, lengths: list[int], length: int) -> DecodeState:
    """Rows r0.. right-aligned in a buffer of ``length`` columns; every cached value names (row, layer, column)."""
    st = DecodeState(num_layers=2, heads=1, head_dim=2, num_codebooks=4, pad=0, dtype=torch.float32, device="cpu")
    st.rows = [_row(f"r{i}") for i in range(len(lengths))]
    st.cfg = cfg
    st.length = st.capacity = length
    st.offsets = torch.tensor([length - n for n in lengths])
    mult = 2 if cfg else 1
    for layer in range(2):
        k = torch.zeros(len(lengths) * mult, 1, length, 2)
        for p in range(len(lengths) * mult):
            i = p % len(lengths)
            for c in range(length - lengths[i], length):
                k[p, 0, c] = torch.tensor([1000 * p + 10 * layer + c, 0.5])
        st.k_bufs.append(k)
        st.v_bufs.append(-k)
    return st


@pytest.mark.parametrize("cfg", [False, True])
def test_assemble_keeps_drops_and_adds_rows_column_for_column(cfg: bool) -> None:
    st = _state(cfg, lengths=[5, 3, 4], length=6)
    before_k = [k.clone() for k in st.k_bufs]
    mult = 2 if cfg else 1
    fresh_len = 7
    fresh_kv = [(torch.full((mult, 1, fresh_len, 2), 7.0 + layer), torch.full((mult, 1, fresh_len, 2), -7.0))
                for layer in range(2)]
    st.assemble([2, 0], [_row("new")], fresh_kv, fresh_len, [2], cfg, room=3)
    assert [r.key for r in st.rows] == ["r2", "r0", "new"]
    # kept rows: compacted to the longest kept (5 columns), right-aligned in the new 7, fresh rows full width
    assert st.length == 7 and st.capacity == 10
    assert st.offsets.tolist() == [3, 2, 2]
    for layer in range(2):
        k, v = st.k_bufs[layer], st.v_bufs[layer]
        assert k.shape == (3 * mult, 1, 10, 2)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert (k[:, :, 7:] == 0).all()  # the free room
        for half in range(mult):
            for new_i, old_i in ((0, 2), (1, 0)):
                got = k[half * 3 + new_i, 0, 2:7]  # old columns 1..5 moved to 2..6
                want = before_k[layer][half * 3 + old_i, 0, 1:6]
                assert torch.equal(got, want)
                assert torch.equal(v[half * 3 + new_i, 0, 2:7], -want)
                assert (k[half * 3 + new_i, 0, :2] == 0).all()
            assert (k[half * 3 + 2, 0, :7] == 7.0 + layer).all()
            assert (v[half * 3 + 2, 0, :7] == -7.0).all()


def test_fit_sizes_the_buffer_to_the_chunk_and_drops_unused_columns() -> None:
    st = _state(True, lengths=[2, 3], length=8)  # columns 0..4 are used by no row
    before = st.k_bufs[1].clone()
    st.fit(4)
    assert st.length == 3 and st.capacity == 7 and st.offsets.tolist() == [1, 0]
    assert torch.equal(st.k_bufs[1][:, :, :3], before[:, :, 5:])
    assert (st.k_bufs[1][:, :, 3:] == 0).all()


def _write_chunk(st: DecodeState, steps: int) -> None:
    """What a chunk's decode steps do to the buffers: each step writes one column per row and layer."""
    for _ in range(steps):
        for layer in range(st.num_layers):
            st.k_bufs[layer][:, :, st.length] = float(st.length)
            st.v_bufs[layer][:, :, st.length] = -float(st.length)
        st.length += 1


def test_rebuilds_reuse_the_storage_the_previous_rebuild_replaced() -> None:
    st = _state(True, lengths=[40, 40], length=40)
    st.fit(2)
    _write_chunk(st, 2)
    first = st.k_bufs[0]._base  # allocated with room to grow
    assert first is not None and first.numel() > st.k_bufs[0].numel()
    st.fit(2)  # the test's original buffers are too small to take: a new storage
    _write_chunk(st, 2)
    st.fit(2)  # the first storage is spare and big enough: taken again, no new allocation
    assert st.k_bufs[0]._base.data_ptr() == first.data_ptr()
    assert st.length == 44 and st.capacity == 46
    k = st.k_bufs[0]
    assert torch.equal(k[0, 0, 39:44, 0], torch.tensor([39.0, 40.0, 41.0, 42.0, 43.0]))  # the columns came along
    assert (k[:, :, 44:] == 0).all()  # reused storage, but the free room is zeroed again
    assert st.nbytes() >= sum(t.numel() * 4 for t in st.spare) + sum(t._base.numel() * 4 for t in st.k_bufs)
    # a batch emptied holds no spare storage
    st.forget("r0")
    st.forget("r1")
    assert st.spare == [] and st.nbytes() == 0


def test_a_rejoin_is_sized_for_the_coming_chunk_so_it_is_not_rebuilt_twice() -> None:
    st = _state(True, lengths=[5, 3], length=6)
    st.park({"r1"})
    st.unpark(["r1"], room=6)  # the coming chunk: 3 frames, up to 3 more warm-up steps
    assert st.row_keys() == ["r0", "r1"] and st.capacity == st.length + 6
    buffers = st.k_bufs[0]
    st.fit(3)  # a few spare columns are left alone: attention reads them, but a rebuild would copy everything
    assert st.k_bufs[0] is buffers
    st.fit(6)
    assert st.k_bufs[0] is buffers
    st.fit(7)  # no room: rebuilt
    assert st.k_bufs[0] is not buffers and st.capacity == st.length + 7


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("frames", [0, 1, 2, 3, 4, 9])
def test_the_delay_pattern_puts_codebook_k_of_frame_f_at_column_f_plus_1_plus_its_delay(channels: int,
                                                                                      frames: int) -> None:
    p = DelayPattern(4 * channels, channels)
    assert list(p.delays) == ([0, 1, 2, 3] if channels == 1 else [0, 0, 1, 1, 2, 2, 3, 3]) and p.max_delay == 3
    K = p.num_codebooks
    ctx = np.arange(K * frames, dtype=np.int64).reshape(K, frames) + 1
    for count in range(frames + 6):
        whole = p.columns(ctx, count, pad=-7)
        assert whole.shape == (K, count)
        for col in range(count):
            expected = [ctx[k, col - 1 - d] if 0 <= col - 1 - d < frames else -7 for k, d in enumerate(p.delays)]
            np.testing.assert_array_equal(whole[:, col], expected)
            np.testing.assert_array_equal(p.column(ctx, col, pad=-7), expected)


@pytest.mark.parametrize("channels", [1, 2])
def test_warm_up_forcing_and_frames_read_the_columns_back(channels: int) -> None:
    """A row prefilled with T frames: its forced warm-up values are the pattern's columns T+1.. over the whole
    music, and the frames its sampled columns complete are the music's frames T.. again."""
    p = DelayPattern(4 * channels, channels)
    K, T, N = p.num_codebooks, 10, 30
    music = np.random.default_rng(channels).integers(0, 2048, (K, N))
    full = p.columns(music, N + p.max_delay + 1, pad=-7)
    forced = p.warmup(music[:, :T], pad=-7)
    for j in range(K):
        for k, d in enumerate(p.delays):
            assert forced[k, j] == (full[k, T + 1 + j] if j < d else -1), (k, j)
    new, rest = p.frames([full[:, c] for c in range(T + 1, N + p.max_delay + 1)])
    np.testing.assert_array_equal(new, music[:, T:])
    assert len(rest) == p.max_delay
