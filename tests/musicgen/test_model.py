"""The real model wrapper on a tiny random-weight checkpoint: loading, and the batched continuation loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radio.config import Sampling
from radio.musicgen.model import ContinuationRequest, MusicgenModel

GREEDY = Sampling(temperature=0.0, top_k=250, guidance=3.0)


DECODERS = ["dynamic", "static"]  # the CPU layout, and the GPU's slot path run eagerly: both must give the same codes


@pytest.fixture(scope="module", params=DECODERS)
def model(tiny_model_dir: Path, request: pytest.FixtureRequest) -> MusicgenModel:
    return MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1, decoder=request.param)


def _generate_codes(model: MusicgenModel, prompt: str, context: np.ndarray, frames: int) -> np.ndarray:
    """transformers' own generate (greedy), returning the codes it hands to EnCodec."""
    captured: list[torch.Tensor] = []  # one call per channel: stereo decodes left, then right
    real_decode = model.model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured.append(codes.clone())
        return real_decode(codes, *args, **kwargs)

    model.model.audio_encoder.decode = capture
    try:
        tokens = model.tokenizer([prompt], return_tensors="pt")
        kwargs = {}
        if context.shape[1]:
            kwargs["decoder_input_ids"] = torch.from_numpy(context).reshape(model.num_codebooks, -1)
        # a few extra steps: generate pads the last frames of its window (the delay pattern's tail)
        model.model.generate(**tokens, **kwargs, do_sample=False, guidance_scale=3.0, max_new_tokens=frames + 8)
    finally:
        model.model.audio_encoder.decode = real_decode
    halves = [c[0, 0].numpy() for c in captured]
    codes = np.empty((model.num_codebooks, halves[0].shape[1]), np.int64)
    for channel, half in enumerate(halves):  # the channels' codebooks interleave
        codes[channel::len(halves)] = half
    T = context.shape[1]
    return codes[:, T:T + frames]


def test_test_model_loads_with_from_pretrained_and_generates(tiny_model_dir: Path) -> None:
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    inputs = processor(text=["lofi piano with rain"], padding=True, return_tensors="pt")
    audio = model.generate(**inputs, max_new_tokens=13)
    assert audio.shape == (1, 1, 10 * 640)  # 13 steps - 3 delay steps = 10 frames of 640 samples
    assert torch.isfinite(audio).all() and audio.abs().max() > 0
    assert model.config.audio_encoder.sampling_rate == 32000 and model.config.decoder.num_codebooks == 4


@pytest.mark.parametrize("context_frames", [0, 1, 2, 37])
def test_continuation_matches_transformers_generate(model: MusicgenModel, context_frames: int) -> None:
    rng = np.random.default_rng(context_frames)
    context = rng.integers(0, model.vocab_size, (4, context_frames))
    ours = model.continue_batch([ContinuationRequest(context, "jazz piano at night", GREEDY)], 20)[0]
    reference = _generate_codes(model, "jazz piano at night", context, 20)
    np.testing.assert_array_equal(ours.codes, reference)


def test_rows_with_shorter_context_are_unaffected_by_batching(model: MusicgenModel) -> None:
    """Left padding + per-row positions: each row generates what it would alone."""
    rng = np.random.default_rng(7)
    requests = [
        ContinuationRequest(rng.integers(0, model.vocab_size, (4, 60)), "ambient pads", GREEDY),
        ContinuationRequest(np.zeros((4, 0), np.int64), "fast techno drums", GREEDY),
        ContinuationRequest(rng.integers(0, model.vocab_size, (4, 5)), "lofi rain", GREEDY),
    ]
    together = model.continue_batch(requests, 15)
    for request, batched in zip(requests, together):
        alone = model.continue_batch([request], 15)[0]
        np.testing.assert_array_equal(batched.codes, alone.codes)


def test_per_row_sampling_settings_apply_to_their_row_only(model: MusicgenModel) -> None:
    rng = np.random.default_rng(3)
    ctx = rng.integers(0, model.vocab_size, (4, 20))
    greedy = ContinuationRequest(ctx, "mellow jazz", GREEDY)
    wild = ContinuationRequest(ctx, "mellow jazz", Sampling(temperature=3.0, top_k=64, guidance=1.0))
    greedy_alone = model.continue_batch([greedy], 30)[0].codes
    mixed = model.continue_batch([wild, greedy, wild], 30)
    np.testing.assert_array_equal(mixed[1].codes, greedy_alone)
    # the hot rows sample: they differ from greedy and from each other
    assert (mixed[0].codes != greedy_alone).mean() > 0.3
    assert (mixed[0].codes != mixed[2].codes).mean() > 0.3


def test_top_k_limits_each_row(model: MusicgenModel) -> None:
    ctx = np.zeros((4, 10), np.int64)
    # top_k 1 is greedy whatever the temperature
    hot_but_k1 = ContinuationRequest(ctx, "rock", Sampling(temperature=5.0, top_k=1, guidance=3.0))
    plain_greedy = ContinuationRequest(ctx, "rock", GREEDY)
    a, b = model.continue_batch([hot_but_k1, plain_greedy], 12)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_pcm_covers_overlap_plus_new_frames(model: MusicgenModel) -> None:
    ctx = np.random.default_rng(0).integers(0, model.vocab_size, (4, 30))
    res = model.continue_batch([ContinuationRequest(ctx, "piano", GREEDY, overlap=10),
                                ContinuationRequest(ctx[:, :4], "piano", GREEDY, overlap=10)], 25)
    assert res[0].overlap == 10 and res[0].pcm.shape == ((10 + 25) * 640,)
    assert res[1].overlap == 4 and res[1].pcm.shape == ((4 + 25) * 640,)
    assert res[0].pcm.dtype == np.float32 and np.isfinite(res[0].pcm).all()
    assert model.calls >= 1 and model.last_batch_size == 2


def test_text_encodings_are_cached(model: MusicgenModel) -> None:
    first = model.encode_text("a brand new prompt")
    assert model.encode_text("a brand new prompt") is first


def _station_run(model: MusicgenModel, key: str, context: np.ndarray, chunks: list[int], keep: int | None = None,
                 prompt: str = "lofi piano"):
    """Drive the model like the engine drives one station: context grows by what the model returns."""
    ctx = context
    results = []
    for frames in chunks:
        request = ContinuationRequest(ctx if keep is None else ctx[:, -keep:], prompt, GREEDY, key=key)
        res = model.continue_batch([request], frames)[0]
        results.append((request, res))
        ctx = np.concatenate([ctx, res.codes], axis=1)
    return results


def test_cached_chunks_equal_one_long_generation_with_one_step_per_frame(model: MusicgenModel) -> None:
    ctx = np.random.default_rng(11).integers(0, model.vocab_size, (4, 25))
    runs = _station_run(model, "station-a", ctx, [10, 10, 10, 10])
    assert [r.fresh for _, r in runs] == [True, False, False, False]  # prefilled once, then cache only
    assert model.last_steps == 10  # steady state: exactly one decoder step per new frame
    joined = np.concatenate([r.codes for _, r in runs], axis=1)
    assert joined.shape[1] == 40
    one_shot = model.continue_batch([ContinuationRequest(ctx, "lofi piano", GREEDY)], 40)[0].codes
    np.testing.assert_array_equal(joined, one_shot)


@pytest.mark.parametrize("decoder", DECODERS)
def test_window_reset_reprefills_with_the_delay_pattern_right(tiny_model_dir: Path, decoder: str) -> None:
    small_window = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1, window_frames=40,
                                 decoder=decoder)
    ctx = np.random.default_rng(5).integers(0, small_window.vocab_size, (4, 12))
    runs = _station_run(small_window, "st", ctx, [6] * 12, keep=12)
    resets = [i for i, (_, r) in enumerate(runs) if r.fresh and i > 0]
    assert resets, "the window never reset"
    assert small_window.resets == len(resets)
    for i in resets:
        request, res = runs[i]
        # a reset row continues exactly like a brand-new row given the same (kept) context
        fresh = small_window.continue_batch([ContinuationRequest(request.context, "lofi piano", GREEDY)], 6)[0]
        np.testing.assert_array_equal(res.codes[:, :6], fresh.codes)
    # between resets a row never holds more than the window
    if decoder == "dynamic":
        assert small_window.dynamic_state.length <= 40 + 4 + 2
    else:
        assert int(small_window.slots.st.length.max()) <= 40 + 4


@pytest.mark.parametrize("decoder", DECODERS)
def test_resets_of_rows_started_together_are_spread_over_chunks(tiny_model_dir: Path, decoder: str) -> None:
    m = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=2, window_frames=60, decoder=decoder)
    ctxs = {k: np.zeros((4, 0), np.int64) for k in "abc"}
    fresh_per_call = []
    for _ in range(30):
        reqs = [ContinuationRequest(ctxs[k][:, -10:], "ambient", GREEDY, key=k) for k in "abc"]
        res = m.continue_batch(reqs, 5)
        for k, r in zip("abc", res):
            ctxs[k] = np.concatenate([ctxs[k], r.codes], axis=1)
        fresh_per_call.append(sum(r.fresh for r in res))
    assert fresh_per_call[0] == 3
    assert max(fresh_per_call[1:]) == 1, fresh_per_call  # never two prefills in one chunk
    assert sum(fresh_per_call[1:]) >= 3  # every row was reset at least once


def test_a_changed_context_is_recognised_and_reprefilled(model: MusicgenModel) -> None:
    ctx = np.random.default_rng(1).integers(0, model.vocab_size, (4, 10))
    runs = _station_run(model, "st-b", ctx, [5, 5])
    assert [r.fresh for _, r in runs] == [True, False]
    other = np.random.default_rng(2).integers(0, model.vocab_size, (4, 10))  # e.g. the station was reset
    res = model.continue_batch([ContinuationRequest(other, "lofi piano", GREEDY, key="st-b")], 5)[0]
    assert res.fresh


def test_blend_moves_conditioning_monotonically_from_old_to_new(model: MusicgenModel) -> None:
    old, new = model.encode_text("dark ambient drone"), model.encode_text("fast happy disco with bright synth")
    n = max(old.shape[0], new.shape[0])

    def padded(t):
        out = torch.zeros((n, t.shape[1]))
        out[: t.shape[0]] = t.float()
        return out

    distances = []
    for a in np.linspace(0, 1, 9):
        cond = model.conditioning(ContinuationRequest(np.zeros((4, 0), np.int64), "fast happy disco with bright synth",
                                                      GREEDY, blend_from="dark ambient drone", blend=float(a)))
        distances.append(float((padded(cond) - padded(new)).norm()))
    assert distances[0] == pytest.approx(float((padded(old) - padded(new)).norm()), rel=1e-5)
    assert distances[-1] == pytest.approx(0.0, abs=1e-5)
    assert all(x > y for x, y in zip(distances, distances[1:]))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_station_that_sits_a_chunk_out_keeps_its_cache(tiny_model_dir: Path, decoder: str) -> None:
    """A chunk that leaves a station out (its buffer is full, or a new station runs its first chunk alone) keeps
    its KV cache (parked, or in its slot): it comes back without a prefill and continues exactly as if never
    left out."""
    m = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1, decoder=decoder)
    rng = np.random.default_rng(21)
    ctx = {k: rng.integers(0, m.vocab_size, (4, n)) for k, n in (("a", 12), ("b", 20), ("c", 7))}

    def chunk(keys: str, frames: int) -> dict[str, object]:
        res = m.continue_batch([ContinuationRequest(ctx[k], f"prompt {k}", GREEDY, key=k) for k in keys], frames)
        for k, r in zip(keys, res):
            ctx[k] = np.concatenate([ctx[k], r.codes], axis=1)
        return dict(zip(keys, res))

    start = {k: v.copy() for k, v in ctx.items()}
    chunk("abc", 6)
    chunk("c", 5)  # a and b sit out
    if decoder == "dynamic":
        assert set(m.dynamic_state.parked) == {"a", "b"} and m.dynamic_state.row_keys() == ["c"]
    back = chunk("abc", 7)
    assert not back["a"].fresh and not back["b"].fresh and not back["c"].fresh
    if decoder == "dynamic":
        assert not m.dynamic_state.parked
    # Same codes as one uninterrupted greedy run of each station alone.
    for k, frames in (("a", 13), ("b", 13), ("c", 18)):
        alone = m.continue_batch([ContinuationRequest(start[k], f"prompt {k}", GREEDY)], frames)[0].codes
        np.testing.assert_array_equal(ctx[k][:, start[k].shape[1]:], alone, err_msg=k)
    # A parked station whose codes changed meanwhile is prefilled afresh; a forgotten one is gone.
    chunk("a", 3)
    ctx["b"] = ctx["b"][:, :-2]
    assert chunk("ab", 3)["b"].fresh
    chunk("a", 3)
    m.forget("b")
    assert m.memory_bytes() > 0
    if decoder == "dynamic":
        assert "b" not in m.dynamic_state.parked
    else:
        assert "b" not in m.slots.keys


def test_decoding_uses_no_deprecated_transformers_api(model: MusicgenModel) -> None:
    """A name transformers has deprecated is one a later 5.x release removes (``past_key_values`` goes in 5.40):
    the prefill and the step loop must call the decoder by its current names."""
    import warnings

    ctx = np.random.default_rng(3).integers(0, model.vocab_size, (4, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.continue_batch([ContinuationRequest(ctx, "a deprecation check", GREEDY, key="dep")], 5)
        model.forget("dep")
    deprecated = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and "transformers" in w.filename]
    assert not deprecated, [str(w.message) for w in deprecated]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_prompt_longer_than_the_slots_hold_joins_with_the_right_codes(tiny_model_dir: Path, decoder: str) -> None:
    """A prompt of more text tokens than a slot holds at first grows every slot's prompt buffers (the static
    path reallocates them) in the middle of a chunk: the running station and the newcomer both keep
    transformers' codes."""
    m = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1, decoder=decoder)
    long = ("a very long and detailed description of slowly evolving ambient music with warm analog synth pads, "
            "distant church bells, soft rain on a tin roof, deep sub bass swells, granular textures, field "
            "recordings of a harbour at dawn, gentle tape saturation and a hint of shimmering reverb")
    assert m.tokenizer([long], return_tensors="pt")["input_ids"].shape[1] > 64
    rng = np.random.default_rng(8)
    ctx = {"a": rng.integers(0, m.vocab_size, (4, 9)), "b": rng.integers(0, m.vocab_size, (4, 6))}
    prompts = {"a": "jazz piano at night", "b": long}
    first = m.continue_batch([ContinuationRequest(ctx["a"], prompts["a"], GREEDY, key="a")], 5)[0]
    ctx["a"] = np.concatenate([ctx["a"], first.codes], axis=1)
    both = m.continue_batch([ContinuationRequest(ctx[k], prompts[k], GREEDY, key=k) for k in "ab"], 12)
    for k, got in zip("ab", both):  # (a chunk with a fresh row makes a few frames more: its warm-up steps)
        np.testing.assert_array_equal(got.codes[:, :12], _generate_codes(m, prompts[k], ctx[k], 12))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_chunk_cut_short_by_an_error_is_prefilled_afresh_next_time(tiny_model_dir: Path, decoder: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that ran part-way advanced the caches past what their stations' codes say: the next chunk must not
    continue those caches (the same greedy codes as a decoder that was never interrupted)."""
    m, twin = (MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=3, decoder=decoder)
               for _ in range(2))
    ctx = {k: np.random.default_rng(9).integers(0, m.vocab_size, (4, 7)) for k in "ab"}

    def chunk(model: MusicgenModel) -> list[np.ndarray]:
        return [r.codes for r in model.continue_batch([ContinuationRequest(ctx[k], "jazz", GREEDY, key=k)
                                                       for k in "ab"], 5)]

    first, _ = chunk(m), chunk(twin)
    for k, c in zip("ab", first):
        ctx[k] = np.concatenate([ctx[k], c], axis=1)
    import radio.musicgen.dynamic as dynamic_module
    import radio.musicgen.slots as slots_module

    owner, name = (slots_module, "decode_step") if decoder == "static" else (dynamic_module, "row_logits")
    real, calls = getattr(owner, name), []

    def flaky(*args, **kwargs):  # the third step of the chunk fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        chunk(m)
    monkeypatch.undo()
    for ours, theirs in zip(chunk(m), chunk(twin)):
        np.testing.assert_array_equal(ours, theirs[:, :ours.shape[1]])


def test_out_of_device_memory_in_encodec_halves_its_group_and_decodes_everything(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    m, twin = (MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1) for _ in range(2))
    real = m.model.audio_encoder.decode
    sizes: list[int] = []

    def tight(codes, *args, **kwargs):  # (1, stations, K, frames): more than 2 stations at once do not fit
        sizes.append(codes.shape[1])
        if codes.shape[1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(codes, *args, **kwargs)

    monkeypatch.setattr(m.model.audio_encoder, "decode", tight)
    rng = np.random.default_rng(10)
    reqs = [ContinuationRequest(rng.integers(0, m.vocab_size, (4, 6)), "jazz", GREEDY, key=f"s{i}") for i in range(5)]
    with caplog.at_level("WARNING", logger="radio.musicgen.model"):
        got = m.continue_batch(reqs, 8)
    want = twin.continue_batch(reqs, 8)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.codes, w.codes)
        np.testing.assert_allclose(g.pcm, w.pcm, atol=1e-5)
    assert sizes[0] == 5 and max(sizes[1:]) <= 2 and m.decode_group == 2
    assert any("out of device memory in EnCodec" in r.getMessage() for r in caplog.records)
    sizes.clear()
    m.continue_batch(reqs, 8)
    assert max(sizes) <= 2  # the smaller group is kept


def test_encodec_runs_in_bf16_where_the_cpu_decoder_does_and_a_probe_agrees(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``codec: auto``: a bf16 CPU decoder's EnCodec runs in bf16, its audio within the probe's floor of float32's
    for the same codes; a float32 decoder's, or ``codec: float32``, stays float32; a probe under the floor keeps
    float32 and says so."""
    import radio.musicgen.codec as codec_module
    from radio.musicgen.model import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 instructions: its decoder runs in float32")
    half = MusicgenModel(str(tiny_model_dir), device="cpu", weights="bfloat16", seed=1, compile="never")
    full = MusicgenModel(str(tiny_model_dir), device="cpu", weights="bfloat16", seed=1, compile="never",
                         codec="float32")
    assert (half.describe()["codec"], full.describe()["codec"]) == ("bfloat16", "float32")
    assert half.codec.snr_db is not None and half.codec.snr_db >= codec_module.SNR_FLOOR_DB
    assert MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32").describe()["codec"] == "float32"
    rng = np.random.default_rng(4)
    reqs = [ContinuationRequest(rng.integers(0, half.vocab_size, (4, 30)), "jazz", GREEDY, key="s")]
    got, want = half.continue_batch(reqs, 20)[0], full.continue_batch(reqs, 20)[0]
    np.testing.assert_array_equal(got.codes, want.codes)  # the decoder is the same: only EnCodec differs
    assert got.pcm.dtype == np.float32 and got.pcm.shape == want.pcm.shape
    signal, noise = (float(np.sum(np.square(x, dtype=np.float64))) for x in (want.pcm, got.pcm - want.pcm))
    snr = 10 * np.log10(signal / noise)
    assert codec_module.SNR_FLOOR_DB <= snr < 200, snr  # bf16 audio, close to float32's (not the same numbers)
    monkeypatch.setattr(codec_module, "SNR_FLOOR_DB", float("inf"))
    with caplog.at_level("WARNING", logger="radio.musicgen.codec"):
        strict = MusicgenModel(str(tiny_model_dir), device="cpu", weights="bfloat16", compile="never")
    assert strict.describe()["codec"] == "float32"
    assert any("keeping float32" in r.getMessage() for r in caplog.records)


def test_encodec_out_of_memory_for_a_single_station_is_a_model_error(tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from radio.errors import ModelError

    m = MusicgenModel(str(tiny_model_dir), device="cpu", dtype="float32", seed=1)

    def none_fit(codes, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(m.model.audio_encoder, "decode", none_fit)
    with pytest.raises(ModelError, match="out of device memory decoding one station's audio"):
        m.continue_batch([ContinuationRequest(np.zeros((4, 3), np.int64), "jazz", GREEDY, key=f"s{i}")
                          for i in range(3)], 4)


SETTING_MIX = [Sampling(temperature=0.0, top_k=250, guidance=g) for g in (0.0, 0.5, 1.0, 3.0)] + [
    Sampling(temperature=2.0, top_k=1, guidance=0.5), Sampling(temperature=0.0, top_k=1, guidance=3.0)]


@pytest.fixture(scope="module")
def prompt_driven_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its cross-attention outputs scaled up, so that the prompt (and so guidance) decides
    the codes: in the plain random-weight model, conditional and unconditional rows pick the same codes."""
    import shutil

    from transformers import MusicgenForConditionalGeneration

    out = tmp_path_factory.mktemp("prompt-driven") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = MusicgenForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.decoder.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(1000.0)
    model.save_pretrained(out)
    return out


def test_a_stations_codes_depend_only_on_its_own_settings(prompt_driven_model_dir: Path) -> None:
    """Guidance, temperature and top-k of one station never change another's codes: a greedy station's codes are
    the same alone, beside stations of every other setting (guided, unguided, sampled), and on both paths."""
    models = {d: MusicgenModel(str(prompt_driven_model_dir), device="cpu", dtype="float32", seed=4, decoder=d)
              for d in DECODERS}
    ctx = np.random.default_rng(11).integers(0, 64, (4, 17))
    neighbours = [Sampling(temperature=0.0, top_k=250, guidance=3.0), Sampling(temperature=1.5, top_k=40, guidance=7.0),
                  Sampling(temperature=1.0, top_k=250, guidance=1.0)]
    codes: dict[float, np.ndarray] = {}
    for settings in SETTING_MIX:
        results = []
        for decoder, model in models.items():
            alone = model.continue_batch([ContinuationRequest(ctx, "dub techno", settings, key="alone")], 12)[0]
            mates = [ContinuationRequest(ctx[:, 3:], f"mate {i}", s, key=f"m{i}") for i, s in enumerate(neighbours)]
            beside = model.continue_batch([mates[0], ContinuationRequest(ctx, "dub techno", settings, key="beside"),
                                           *mates[1:]], 12)[1]
            np.testing.assert_array_equal(beside.codes, alone.codes, err_msg=f"{decoder} {settings}")
            results.append(alone.codes)
        np.testing.assert_array_equal(results[0], results[1], err_msg=f"dynamic vs static, {settings}")
        codes[settings.guidance] = results[0]
    # guidance of 1 or less is plain conditional generation; above 1 it is guided (and sounds different)
    np.testing.assert_array_equal(codes[0.0], codes[1.0])
    np.testing.assert_array_equal(codes[0.5], codes[1.0])
    assert (codes[3.0] != codes[1.0]).any()


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("context_frames", [0, 2, 37])
def test_a_stereo_checkpoint_continues_as_transformers_generate_does(tiny_stereo_model_dir: Path, decoder: str,
                                                                    context_frames: int) -> None:
    """musicgen-stereo's layout: 8 codebooks, the channels' interleaved, a pair delayed alike; two channels of
    PCM, each channel's codebooks through EnCodec."""
    model = MusicgenModel(str(tiny_stereo_model_dir), device="cpu", dtype="float32", seed=1, decoder=decoder)
    assert (model.channels, model.num_codebooks, model.pattern.max_delay) == (2, 8, 3)
    context = np.random.default_rng(context_frames).integers(0, model.vocab_size, (8, context_frames))
    ours = model.continue_batch([ContinuationRequest(context, "jazz piano at night", GREEDY, key="s")], 20)[0]
    np.testing.assert_array_equal(ours.codes, _generate_codes(model, "jazz piano at night", context, 20))
    assert ours.pcm.shape == (20 * 640, 2) and ours.pcm.dtype == np.float32
    assert np.abs(ours.pcm[:, 0] - ours.pcm[:, 1]).max() > 0  # two channels, not one copied
    again = model.continue_batch([ContinuationRequest(np.concatenate([context, ours.codes], axis=1),
                                                      "jazz piano at night", GREEDY, key="s")], 20)[0]
    whole = _generate_codes(model, "jazz piano at night", context, 40)
    np.testing.assert_array_equal(again.codes, whole[:, 20:])  # the cache continues across chunks
