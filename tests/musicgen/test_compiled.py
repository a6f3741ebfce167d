"""The CPU step's layer compiled (musicgen/compiled.py): the same decoder as the eager layer, used where it works,
and the eager layer wherever compiling fails."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from radio.config import Sampling
from radio.musicgen.model import ContinuationRequest, MusicgenModel

GREEDY = Sampling(temperature=0.0, top_k=250, guidance=3.0)


def _requests(model: MusicgenModel) -> list[ContinuationRequest]:
    rng = np.random.default_rng(5)
    return [ContinuationRequest(rng.integers(0, model.vocab_size, (model.num_codebooks, 20 + 7 * i)), prompt,
                                GREEDY, key=f"s{i}")
            for i, prompt in enumerate(["jazz piano at night", "slow ambient pads"])]


def _pair(tiny_model_dir: Path, weights: str, kv: str = "full",
          packed: bool = True) -> tuple[MusicgenModel, MusicgenModel]:
    """The same checkpoint with the eager layer and with the compiled one (``auto`` where that compiles); dense
    weights ``packed`` for oneDNN or left stock."""
    eager = MusicgenModel(str(tiny_model_dir), weights=weights, seed=0, decoder="dynamic", compile="never", kv=kv,
                          fast_kernels=packed)
    compiled = MusicgenModel(str(tiny_model_dir), weights=weights, seed=0, decoder="dynamic", kv=kv,
                             compile="auto" if weights != "float32" else "always", fast_kernels=packed)
    assert compiled.compile and not eager.compile, "the compiler must work where the tests run (g++ installed)"
    assert "compiled layers" in str(compiled.describe()["kernels"])
    assert "compiled" not in str(eager.describe()["kernels"])
    return eager, compiled


def _codes(m: MusicgenModel, reqs: list[ContinuationRequest]) -> list[np.ndarray]:
    """One station's first chunk, then both stations' next one (the two batch forms a CPU meets first)."""
    return [m.continue_batch(reqs[:1], 12)[0].codes] + [r.codes for r in m.continue_batch(reqs, 16)]


def _logits_error(eager: MusicgenModel, compiled: MusicgenModel, request: ContinuationRequest,
                  codes: np.ndarray) -> tuple[float, float]:
    """Teacher-forced over ``codes``: the compiled model's logits' relative error and top-1 agreement."""
    want = eager.decode_path.teacher_forced_logits(request, codes)
    got = compiled.decode_path.teacher_forced_logits(request, codes)
    return float((got - want).norm() / want.norm()), float((got.argmax(-1) == want.argmax(-1)).float().mean())


@pytest.mark.parametrize("kv, packed", [("full", False), ("full", True), ("8bit", False)])
def test_the_compiled_layer_is_the_eager_decoder_in_float32_and_a_lost_cache_write_shows(
        tiny_model_dir: Path, kv: str, packed: bool) -> None:
    """float32 (``compile: always``), over a full cache and an 8-bit one (which the compiled layer dequantizes
    inside its attention, the eager one through upcast buffers): the compiled layer gives the eager decoder's
    greedy codes across chunks and batch forms, and its logits to float32's rounding. A compiled layer whose new
    keys/values never reach the cache (an in-place write lost: the way a compiled step can go wrong) breaks the
    bound. The steps run the layer's forms made at load without their guards' check (where the weights are
    plain tensors: oneDNN's packed ones cannot be captured so, and keep the checked path)."""
    import radio.musicgen.step as step_module

    eager, compiled = _pair(tiny_model_dir, "float32", kv, packed)
    reqs = _requests(eager)
    want = _codes(eager, reqs)
    for got, expected in zip(_codes(compiled, reqs), want):
        np.testing.assert_array_equal(got, expected)
    layer = compiled.decode_path.layer
    if packed:
        assert layer.forms() == set() and layer.unchecked_calls == 0
    else:
        assert layer.forms() == {1, 2} and layer.unchecked_calls > 0, "the steps must run the forms made at load"
    assert compiled.dynamic_state.k_bufs[0].dtype == (torch.int8 if kv == "8bit" else torch.float32)
    error, top1 = _logits_error(eager, compiled, reqs[0], want[0])
    assert error < 1e-4 and top1 == 1.0, (error, top1)

    def unwritten(layer: object, h: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, *rest: object) -> torch.Tensor:
        return step_module.layer_step(layer, h, kc.clone(), vc.clone(), *rest)  # type: ignore[arg-type]

    compiled.decode_path.layer._compiled = torch.compile(unwritten, dynamic=True)
    broken, _ = _logits_error(eager, compiled, reqs[0], want[0])
    assert broken > 1e-3, broken


def test_the_compiled_layer_keeps_the_bf16_decoder_s_codes(tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, the CPU default (``compile: auto``): the compiled layer (which computes attention in float32 inside
    its loops) against the eager bf16 layer: teacher-forced logits within bf16's rounding, and the greedy codes
    of two stations over two chunks mostly the same; and those chunks compile nothing more (the load's probe
    compiled both batch forms, with the decode loop's kinds of tensors, and at sizes none of the model's own:
    here its default cache width is set to the model's width, which the compiler would have tied to it)."""
    import radio.musicgen.compiled as compiled_module
    from torch._dynamo.utils import counters

    width = json.loads((tiny_model_dir / "config.json").read_text())["decoder"]["hidden_size"]
    monkeypatch.setattr(compiled_module, "PROBE_COLUMNS", width)
    eager, compiled = _pair(tiny_model_dir, "bfloat16")
    reqs = _requests(eager)
    want = _codes(eager, reqs)
    graphs = counters["stats"]["unique_graphs"]
    got = _codes(compiled, reqs)
    assert counters["stats"]["unique_graphs"] == graphs, "the load's probe must have compiled the real steps' forms"
    agree = np.mean([np.mean(a == b) for a, b in zip(got, want)])
    assert agree > 0.9, agree  # measured: 1.0
    error, top1 = _logits_error(eager, compiled, reqs[0], want[0])
    assert error < 0.02 and top1 > 0.9, (error, top1)  # measured: 0.0055 and 0.96


def test_a_model_keeps_the_eager_layer_where_compiling_fails_or_disagrees(tiny_model_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """No C++ compiler (the compile raises), a probe that disagrees, or a compiled step that fails mid-run: the
    model runs the eager layer, says so in the log, and its codes are the eager model's."""
    import radio.musicgen.compiled as compiled_module

    eager = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic", compile="never")
    reqs = _requests(eager)[:1]
    want = eager.continue_batch(reqs, 10)[0].codes

    def no_compiler(fn: object, **kwargs: object) -> object:
        def fails(*args: object, **kw: object) -> object:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fails

    with caplog.at_level(logging.WARNING, logger="radio.musicgen.compiled"):
        monkeypatch.setattr(compiled_module.torch, "compile", no_compiler)
        m = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic", compile="always")
    monkeypatch.undo()
    assert not m.compile and "compiled" not in str(m.describe()["kernels"])
    assert "No working C++ compiler" in caplog.text and "keeping the eager layer" in caplog.text
    np.testing.assert_array_equal(m.continue_batch(reqs, 10)[0].codes, want)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radio.musicgen.compiled"):
        monkeypatch.setattr(compiled_module, "_probe", lambda *args: 0.5)
        m = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic")
    monkeypatch.undo()
    assert not m.compile and "disagrees with the eager one" in caplog.text

    m = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic")
    layer = m.decode_path.layer
    assert isinstance(layer, compiled_module.CompiledLayer) and m.compile

    def breaks(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("C++ compile error")

    class Unchecked:  # the forms made at load, failing the same way
        def guard_check(self, *args: object, **kwargs: object) -> bool:
            return True

        __call__ = staticmethod(breaks)

    layer._compiled = breaks
    layer._unchecked = {form: Unchecked() for form in layer._unchecked}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radio.musicgen.compiled"):
        got = m.continue_batch(reqs, 10)[0].codes
    assert "runs the eager layer from now on" in caplog.text and layer.failed is not None
    assert caplog.text.count("compiled decoder layer failed") == 1
    assert "compiled" not in str(m.describe()["kernels"])
    np.testing.assert_array_equal(got, want)


def test_a_chunk_whose_inputs_fail_the_guards_runs_the_checked_layer(tiny_model_dir: Path) -> None:
    """Inside a chunk a layer skips the compiled code's guards only after they held on its first call: where they
    do not, every call of the chunk takes the checked path (which compiles what it needs), with the same codes."""
    eager, compiled = _pair(tiny_model_dir, "float32", packed=False)
    reqs = _requests(eager)
    want = _codes(eager, reqs)
    layer = compiled.decode_path.layer
    assert layer.forms() == {1, 2}
    before = layer.unchecked_calls  # the load's probe ran each form once
    checks: list[bool] = []
    for fn in layer._unchecked.values():
        fn.guard_check = lambda *args, **kwargs: checks.append(False)  # None: the guards do not hold
    for got, expected in zip(_codes(compiled, reqs), want):
        np.testing.assert_array_equal(got, expected)
    assert layer.unchecked_calls == before
    layers = len(compiled.decode_path.parts.layers)
    assert len(checks) == 2 * layers  # once per layer and chunk, not once per step


def test_compile_is_a_cpu_dynamic_path_setting() -> None:
    from radio.errors import ModelError
    from radio.musicgen.model import resolve_compile

    assert resolve_compile("auto", "cpu", torch.bfloat16, "dynamic", "full")
    assert not resolve_compile("auto", "cpu", torch.float32, "dynamic", "full")  # float32: asked for, not auto
    assert resolve_compile("always", "cpu", torch.float32, "dynamic", "full")
    assert not resolve_compile("auto", "cpu", torch.bfloat16, "dynamic", "8bit")
    assert not resolve_compile("always", "cuda", torch.bfloat16, "static", "full")  # CUDA graphs instead
    assert not resolve_compile("never", "cpu", torch.bfloat16, "dynamic", "full")
    with pytest.raises(ModelError, match="unknown compile 'on'"):
        resolve_compile("on", "cpu", torch.bfloat16, "dynamic", "full")
