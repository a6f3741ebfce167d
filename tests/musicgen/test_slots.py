"""The static (slot) decode path on CPU: the step traces without graph breaks, and slots are accounted for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radio.config import Sampling
from radio.musicgen.model import ContinuationRequest, MusicgenModel
from radio.errors import ModelError, SlotsFull
from radio.musicgen import fused
from radio.musicgen.step import DecoderParts, decode_step

GREEDY = Sampling(temperature=0.0, top_k=250, guidance=3.0)
MIXED = [Sampling(temperature=1.0, top_k=250, guidance=3.0), GREEDY, Sampling(temperature=0.7, top_k=5, guidance=1.0)]


@pytest.fixture
def static(tiny_model_dir: Path) -> MusicgenModel:
    return MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder="static",
                         fast_kernels=False)


def test_the_step_traces_as_one_graph_with_no_host_synchronisation(static: MusicgenModel) -> None:
    """``fullgraph=True`` fails on any graph break: a .item(), a .cpu(), numpy, or Python branching on a tensor's
    value. What traces whole can be captured as a CUDA graph."""
    ctx = np.random.default_rng(0).integers(0, static.vocab_size, (4, 9))
    static.continue_batch([ContinuationRequest(ctx, "jazz", s, key=f"k{i}") for i, s in enumerate(MIXED)], 5)
    slots = static.slots
    st = slots.st
    before = st.t.clone()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    with torch.inference_mode():
        compiled(slots.parts, st, 4, 64, "eager")
    assert int(st.t) == int(before) + 1


def test_slots_are_kept_freed_and_reused_never_double_booked(static: MusicgenModel) -> None:
    rng = np.random.default_rng(1)
    ctx = {k: rng.integers(0, static.vocab_size, (4, 6)) for k in "abcde"}

    def chunk(keys: str) -> None:
        res = static.continue_batch([ContinuationRequest(ctx[k], "ambient", GREEDY, key=k) for k in keys], 4)
        for k, r in zip(keys, res):
            ctx[k] = np.concatenate([ctx[k], r.codes], axis=1)

    slots = static.slots
    chunk("abc")
    first = {k: slots.keys.index(k) for k in "abc"}
    chunk("ab")  # c sits out: keeps its slot
    assert {k: slots.keys.index(k) for k in "abc"} == first
    static.forget("b")
    chunk("acd")  # d takes the slot b left
    assert slots.keys.index("d") == first["b"]
    held = [k for k in slots.keys if k is not None]
    assert sorted(held) == ["a", "c", "d"] and len(held) == len(set(held))
    chunk("acde")
    assert sorted(k for k in slots.keys if k is not None) == ["a", "c", "d", "e"]
    static.continue_batch([ContinuationRequest(ctx["a"], "x", GREEDY)], 3)  # keyless: its slot is freed at once
    assert sorted(k for k in slots.keys if k is not None) == ["a", "c", "d", "e"]
    for k in "acde":
        static.forget(k)
    assert all(k is None for k in slots.keys)


def test_more_stations_than_fit_is_a_clear_refusal(static: MusicgenModel) -> None:
    static.slots.max_slots = 2
    reqs = [ContinuationRequest(np.zeros((4, 0), np.int64), "x", GREEDY, key=k) for k in "abc"]
    with pytest.raises(SlotsFull) as info:
        static.continue_batch(reqs, 3)
    assert info.value.keys == ["c"] and "2 slots fit in memory" in str(info.value)
    res = static.continue_batch(reqs[:2], 3)  # the ones that fit still run
    assert len(res) == 2
    # ...and a refusal while they play costs them nothing: they continue their caches, no prefill
    reqs = [ContinuationRequest(r.codes, "x", GREEDY, key=k) for k, r in zip("ab", res)] + reqs[2:]
    with pytest.raises(SlotsFull):
        static.continue_batch(reqs, 3)
    assert not any(r.fresh for r in static.continue_batch(reqs[:2], 3))


def test_mixed_sampling_settings_share_one_step(static: MusicgenModel, tiny_model_dir: Path) -> None:
    """A greedy row batched with sampled rows gives exactly what it gives alone."""
    ctx = np.random.default_rng(2).integers(0, static.vocab_size, (4, 11))
    mixed = static.continue_batch([ContinuationRequest(ctx, "jazz", s, key=f"m{i}") for i, s in enumerate(MIXED)], 12)
    alone = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=9, decoder="static",
                          fast_kernels=False).continue_batch([ContinuationRequest(ctx, "jazz", GREEDY)], 12)[0]
    np.testing.assert_array_equal(mixed[1].codes, alone.codes)
    top5 = mixed[2].codes
    assert top5.shape == (4, 12) and (top5 >= 0).all() and (top5 < static.vocab_size).all()


def test_out_of_device_memory_in_a_step_shrinks_the_slots_and_is_a_model_error(static: MusicgenModel,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [ContinuationRequest(np.zeros((4, 0), np.int64), "x", GREEDY, key=k) for k in "abc"]
    static.continue_batch(reqs, 3)
    import radio.musicgen.slots as slots_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(slots_module, "decode_step", oom)
    with pytest.raises(ModelError, match="now at most 2 slots"):
        static.continue_batch(reqs, 3)
    monkeypatch.undo()
    with pytest.raises(SlotsFull):  # three stations no longer fit: one waits
        static.continue_batch(reqs, 3)
    assert len(static.continue_batch(reqs[:2], 3)) == 2  # the others go on (re-prefilled)


@pytest.mark.parametrize("kernel", ["sdpa", "fused"])
def test_the_cuda_arrangement_of_the_step_gives_the_same_codes(static: MusicgenModel, tiny_model_dir: Path,
                                                               kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What CUDA runs (fused q/k/v and head products; PyTorch's fused attention, or our fused kernels under
    Triton's interpreter), run here on CPU: the same greedy codes as the eager step, across chunks and a joining
    station."""
    heads = static.model.config.decoder.num_attention_heads
    if kernel == "fused" and not fused.available("cpu", torch.float32, heads,
                                                 static.model.config.decoder.hidden_size // heads):
        pytest.skip("triton is not installed")
    monkeypatch.setattr(fused, "TARGET_PROGRAMS", 16)  # fewer programs: the interpreter runs each in Python
    cuda_like = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder="static",
                              fast_kernels=False)
    slots = cuda_like.slots
    slots.parts = DecoderParts.of(cuda_like.model.decoder, slots.parts.positions, fuse_qkv=True)
    slots.kernels = kernel
    assert slots.parts.qkv is not None and slots.parts.heads_w is not None
    rng = np.random.default_rng(4)
    ctx = {k: rng.integers(0, static.vocab_size, (4, 7 + 3 * i)) for i, k in enumerate("abc")}
    for keys in ("ab", "abc", "bc", "abc"):  # a sits a chunk out (its slot runs along inactive), then resumes
        got = [m.continue_batch([ContinuationRequest(ctx[k], "jazz", GREEDY, key=k) for k in keys], 5)
               for m in (static, cuda_like)]
        for k, ours, theirs in zip(keys, *got):
            np.testing.assert_array_equal(theirs.codes, ours.codes)
            ctx[k] = np.concatenate([ctx[k], ours.codes], axis=1)


def test_the_step_anatomy_leaves_the_next_chunk_as_it_would_have_been(static: MusicgenModel,
                                                                       tiny_model_dir: Path) -> None:
    """``radio bench`` times the running batch's step in parts between chunks: the slots' registers come back,
    the cache columns it wrote are past every slot's length, and the decoder's generator is not drawn from."""
    twin = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder="static",
                         fast_kernels=False)
    assert static.slots.anatomy() is None  # no chunk yet: no batch to time
    rng = np.random.default_rng(5)
    ctx = {k: rng.integers(0, static.vocab_size, (4, 8 + i)) for i, k in enumerate("abc")}
    runs = []
    for m in (static, twin):
        codes = dict(ctx)
        for chunk in range(2):
            keys = "abc" if chunk else "ab"  # c joins in the second chunk
            res = m.continue_batch([ContinuationRequest(codes[k], "jazz", MIXED[i], key=k)
                                    for i, k in enumerate(keys)], 6)
            for k, r in zip(keys, res):
                codes[k] = np.concatenate([codes[k], r.codes], axis=1)
            if m is static:
                parts = m.slots.anatomy(repeats=5)
                assert parts is not None and set(parts) == {"step", "sampling", "noise"}
                assert all(v > 0 for v in parts.values())
        runs.append(codes)
    for k in "abc":
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


def test_a_step_that_cannot_be_captured_runs_eagerly_and_is_tried_once(static: MusicgenModel, tiny_model_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA graph capture that fails costs speed, never a station: the bucket's step runs eagerly from then
    on (the same codes), with one warning, and the capture is not retried every step."""
    graphed = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder="static",
                            fast_kernels=False)
    graphed.slots.graphs_enabled = True
    tries: list[int] = []

    def fail(run: object) -> None:
        tries.append(1)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed.slots, "_capture", fail)
    ctx = {k: np.random.default_rng(6).integers(0, static.vocab_size, (4, 9)) for k in "ab"}
    with caplog.at_level("WARNING", logger="radio.musicgen.slots"):
        for _ in range(2):
            got = [m.continue_batch([ContinuationRequest(ctx[k], "jazz", MIXED[i], key=k)
                                     for i, k in enumerate("ab")], 5) for m in (static, graphed)]
            for k, ours, theirs in zip("ab", *got):
                np.testing.assert_array_equal(theirs.codes, ours.codes)
                ctx[k] = np.concatenate([ctx[k], ours.codes], axis=1)
    assert len(tries) == 1
    assert sum("could not capture the decode step" in r.getMessage() for r in caplog.records) == 1


def test_out_of_device_memory_while_slots_grow_voids_them_cleanly(static: MusicgenModel, tiny_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing the slots replaces their buffers layer by layer; running out of memory half-way must not leave a
    mix of old and new buffers: the chunk is a ModelError, the slots are limited, and the next chunks re-prefill
    every station from its codes (the same greedy codes as a decoder that never ran out)."""
    twin = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder="static",
                         fast_kernels=False)
    rng = np.random.default_rng(7)
    ctx = {k: rng.integers(0, static.vocab_size, (4, 8 + i)) for i, k in enumerate("abc")}

    def chunk(m: MusicgenModel, keys: str) -> dict[str, np.ndarray]:
        res = m.continue_batch([ContinuationRequest(ctx[k], "jazz", GREEDY, key=k) for k in keys], 5)
        return {k: r.codes for k, r in zip(keys, res)}

    def advance(codes: dict[str, np.ndarray]) -> None:
        for k, c in codes.items():
            ctx[k] = np.concatenate([ctx[k], c], axis=1)

    first = chunk(static, "ab")
    assert chunk(twin, "ab").keys() == first.keys()
    advance(first)
    real_full = torch.full
    made: list[tuple] = []

    def full(size, *args, **kwargs):  # the second layer's new key buffer does not fit
        if isinstance(size, tuple) and len(size) == 5 and size[0] == 4:
            made.append(size)
            if len(made) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_full(size, *args, **kwargs)

    monkeypatch.setattr(torch, "full", full)
    with pytest.raises(ModelError, match="out of device memory"):
        chunk(static, "abc")  # c needs a third slot: the slots grow from 2 to 4
    monkeypatch.undo()
    assert static.slots.max_slots == 1  # fewer than were held
    with pytest.raises(SlotsFull):
        chunk(static, "ab")
    static.slots.max_slots = 4  # as if memory were freed again (the bench's reset_slot_limit)
    for _ in range(2):  # (fresh rows make fewer frames than continuing ones in a chunk with warm-up steps)
        ours, theirs = chunk(static, "abc"), chunk(twin, "abc")
        for k in "abc":
            np.testing.assert_array_equal(ours[k], theirs[k][:, :ours[k].shape[1]])
        advance(ours)



def test_describe_reports_the_static_paths_slots(static: MusicgenModel) -> None:
    """What /status and /metrics show of a model on the static path."""
    before = static.describe()
    assert before["decoder"] == "static" and before["slots_used"] == 0 and before["decode_state_bytes"] == 0
    reqs = [ContinuationRequest(np.zeros((4, 5), np.int64), "x", GREEDY, key=k) for k in "abc"]
    static.continue_batch(reqs, 3)
    after = static.describe()
    assert after["slots_used"] == 3 and after["slot_bytes"] == static.slots.bytes_per_slot() > 0
    assert after["decode_state_bytes"] >= 3 * after["slot_bytes"] and after["batch_limit"] == static.slots.max_slots
    static.forget("b")
    assert static.describe()["slots_used"] == 2


def test_slots_that_fit_never_count_below_the_slots_held(static: MusicgenModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With less free device memory than the planner's margin, the estimate keeps what is held (a growth
    planned from a lower figure would cut held slots off)."""
    slots = static.slots
    static.continue_batch([ContinuationRequest(np.zeros((4, 2), np.int64), "x", GREEDY, key=k) for k in "abcde"], 2)
    assert slots.capacity == 8
    monkeypatch.setattr(slots, "cuda", True)  # the CUDA branch, with a nearly full card
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    assert slots.slots_that_fit() == 8
    over = 64 << 20  # free memory 64 MB above the 2 GB margin: that much more in slots
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((2 << 30) + over, 80 << 30))
    assert slots.slots_that_fit() == 8 + over // slots.shape.slot_bytes()


def test_8bit_slots_give_the_codes_of_the_8bit_dynamic_path_eagerly_and_with_the_fused_kernels(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kv: 8bit`` on the GPU path, run here: the slots' eager step, the slots with the fused kernels (under
    Triton's interpreter) and the CPU path all hold the same 8-bit cache and give the same greedy codes across
    chunks, a station sitting a chunk out and one joining; against the full cache most codes stay the same; a
    slot takes about a third of the bytes (float32 here); the step still traces whole (a CUDA graph)."""
    def model(decoder: str, kv: str) -> MusicgenModel:
        return MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder=decoder,
                             fast_kernels=False, kv=kv)

    kv8 = {"dynamic": model("dynamic", "8bit"), "static": model("static", "8bit")}
    heads = kv8["static"].model.config.decoder.num_attention_heads
    head_dim = kv8["static"].model.config.decoder.hidden_size // heads
    if fused.available("cpu", torch.float32, heads, head_dim, kv8=True):
        monkeypatch.setattr(fused, "TARGET_PROGRAMS", 16)  # fewer programs: the interpreter runs each in Python
        cuda_like = kv8["fused"] = model("static", "8bit")
        slots = cuda_like.slots
        slots.parts = DecoderParts.of(cuda_like.model.decoder, slots.parts.positions, fuse_qkv=True)
        slots.kernels = "fused"
    full = model("dynamic", "full")
    assert kv8["static"].describe()["kv"] == "8bit" and full.describe()["kv"] == "full"
    rng = np.random.default_rng(6)
    start = {k: rng.integers(0, full.vocab_size, (4, 7 + 3 * i)) for i, k in enumerate("abc")}
    ctx = {name: {k: c.copy() for k, c in start.items()} for name in [*kv8, "full"]}
    same = total = 0
    for keys in ("ab", "abc", "bc", "abc", "abc"):
        got = {name: m.continue_batch([ContinuationRequest(ctx[name][k], "jazz", GREEDY, key=k) for k in keys], 5)
               for name, m in [*kv8.items(), ("full", full)]}
        for i, k in enumerate(keys):
            want = got["dynamic"][i].codes
            for name in kv8:
                np.testing.assert_array_equal(got[name][i].codes, want, err_msg=f"{name} {k}")
            n = min(want.shape[1], got["full"][i].codes.shape[1])
            same += int((got["full"][i].codes[:, :n] == want[:, :n]).sum())
            total += want[:, :n].size
            for name in ctx:
                ctx[name][k] = np.concatenate([ctx[name][k], got[name][i].codes], axis=1)
    assert same / total > 0.9, same / total  # measured: 1.0 (the tiny model's greedy codes over these chunks)
    st = kv8["static"].slots.st
    assert st.k[0].dtype == torch.int8
    full_slot = model("static", "full").slots.bytes_per_slot()
    assert kv8["static"].slots.bytes_per_slot() < 0.45 * full_slot
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    with torch.inference_mode():
        compiled(kv8["static"].slots.parts, st, 4, 64, "eager")
