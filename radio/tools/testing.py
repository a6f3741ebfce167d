"""Random-weight MusicGen checkpoints for tests and benchmarks.

`make_test_model` writes a directory that `MusicgenForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load offline, exactly like a downloaded checkpoint. The weights are
random, so the audio is noise-like; the shapes (and so the compute cost) are real:

* ``tiny``: a few hundred kB, generates in milliseconds. For tests.
* ``tiny-alt``: another tiny shape (wider, deeper decoder and text encoder; the same codec), so tests can
  run two different models side by side and swap between them.
* ``tiny-stereo``, ``small-stereo``: the same, as stereo checkpoints (facebook/musicgen-stereo-small's layout:
  8 codebooks, the two channels' interleaved, one mono EnCodec decoding each channel).
* ``small``: exactly facebook/musicgen-small's shapes (T5-base text encoder, 32 kHz EnCodec with 4 codebooks
  at 50 Hz, a 24-layer 1024-wide decoder). About 2.4 GB in fp32. For ``radio bench`` only.

Nothing in the daemon's hot path imports this module.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

from . import SHAPES  # the names make_test_model takes


@dataclass(frozen=True)
class Shape:
    """The handful of numbers that decide a MusicGen checkpoint's cost."""

    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    t5_vocab: int
    codebook_size: int
    codebook_dim: int
    encodec_filters: int
    encodec_hidden: int
    encodec_lstm_layers: int
    dec_hidden: int
    dec_layers: int
    dec_heads: int
    dec_ffn: int


_SHAPES: dict[str, Shape] = {
    "tiny": Shape(
        t5_d_model=16, t5_layers=1, t5_heads=2, t5_d_kv=8, t5_d_ff=32, t5_vocab=512,
        codebook_size=64, codebook_dim=8, encodec_filters=2, encodec_hidden=8, encodec_lstm_layers=1,
        dec_hidden=32, dec_layers=2, dec_heads=2, dec_ffn=64,
    ),
    "tiny-alt": Shape(
        t5_d_model=24, t5_layers=2, t5_heads=2, t5_d_kv=12, t5_d_ff=48, t5_vocab=512,
        codebook_size=64, codebook_dim=8, encodec_filters=2, encodec_hidden=8, encodec_lstm_layers=1,
        dec_hidden=48, dec_layers=3, dec_heads=4, dec_ffn=96,
    ),
    # facebook/musicgen-small: t5-base, encodec_32khz, 300M decoder.
    "small": Shape(
        t5_d_model=768, t5_layers=12, t5_heads=12, t5_d_kv=64, t5_d_ff=3072, t5_vocab=32128,
        codebook_size=2048, codebook_dim=128, encodec_filters=64, encodec_hidden=128, encodec_lstm_layers=2,
        dec_hidden=1024, dec_layers=24, dec_heads=16, dec_ffn=4096,
    ),
    # facebook/musicgen-medium (1.5B decoder) and -large (3.3B): the same t5-base and EnCodec, a bigger decoder.
    "medium": Shape(
        t5_d_model=768, t5_layers=12, t5_heads=12, t5_d_kv=64, t5_d_ff=3072, t5_vocab=32128,
        codebook_size=2048, codebook_dim=128, encodec_filters=64, encodec_hidden=128, encodec_lstm_layers=2,
        dec_hidden=1536, dec_layers=48, dec_heads=24, dec_ffn=6144,
    ),
    "large": Shape(
        t5_d_model=768, t5_layers=12, t5_heads=12, t5_d_kv=64, t5_d_ff=3072, t5_vocab=32128,
        codebook_size=2048, codebook_dim=128, encodec_filters=64, encodec_hidden=128, encodec_lstm_layers=2,
        dec_hidden=2048, dec_layers=48, dec_heads=32, dec_ffn=8192,
    ),
}

# Words a station prompt is likely to use, so the in-process tokenizer splits prompts into word pieces
# rather than single letters (the token count then resembles a real T5 tokenizer's).
_WORDS = (
    "music lofi hip hop jazz piano drums bass guitar synth ambient techno house rock pop classical strings "
    "orchestra violin cello slow fast tempo beat beats soft warm mellow chill night rain rainy vinyl crackle "
    "rhodes chords brushed funk disco electronic acoustic dark bright happy sad epic cinematic pads drone "
    "deep space retro 80s 90s wave dream the and with of a in on at for bpm minor major key melody"
).split()


def build_tokenizer(vocab_limit: int):  # -> transformers.T5Tokenizer
    """A T5 (unigram) tokenizer built in-process: special tokens, single characters, common words."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for word in _WORDS:
        for piece in ("\u2581" + word, word):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -2.0 - len(pieces) * 1e-3))
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in ("\u2581" + ch, ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    pieces.append(("\u2581", -5.0))
    extra_ids = 100 if vocab_limit >= len(pieces) + 100 else 0
    if len(pieces) + extra_ids > vocab_limit:
        raise ValueError(f"tokenizer needs {len(pieces) + extra_ids} ids but the text encoder has {vocab_limit}")
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids)


def make_test_model(out_dir: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight MusicGen checkpoint (model, generation config, processor) to ``out_dir``."""
    import torch
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
    )

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    channels = 2 if shape.endswith("-stereo") else 1
    s = _SHAPES[shape.removesuffix("-stereo")]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # decoder_start_token_id: not in the configs' typed signatures, kept as an attribute (generate reads it)
    text = T5Config(  # type: ignore[call-arg]
        vocab_size=s.t5_vocab, d_model=s.t5_d_model, d_kv=s.t5_d_kv, d_ff=s.t5_d_ff, num_layers=s.t5_layers,
        num_heads=s.t5_heads, relative_attention_num_buckets=32, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    # 11 bits per codebook entry at 50 Hz for 2048 entries: 4 codebooks = 2.2 kbit/s, as in encodec_32khz.
    bits = (s.codebook_size - 1).bit_length()
    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[4 * bits * 50 / 1000.0], codebook_size=s.codebook_size, codebook_dim=s.codebook_dim,
        num_filters=s.encodec_filters, hidden_size=s.encodec_hidden, num_lstm_layers=s.encodec_lstm_layers,
        norm_type="weight_norm", pad_mode="reflect", use_causal_conv=False, normalize=False,
        chunk_length_s=None, overlap=None,
    )
    decoder = MusicgenDecoderConfig(  # type: ignore[call-arg]
        vocab_size=s.codebook_size, hidden_size=s.dec_hidden, num_hidden_layers=s.dec_layers,
        num_attention_heads=s.dec_heads, ffn_dim=s.dec_ffn, num_codebooks=4 * channels, max_position_embeddings=2048,
        pad_token_id=s.codebook_size, bos_token_id=s.codebook_size, decoder_start_token_id=s.codebook_size,
        audio_channels=channels,
    )
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    model = MusicgenForConditionalGeneration(config).eval()
    if model.audio_encoder.quantizer.num_quantizers != 4:
        raise RuntimeError("test model EnCodec does not have 4 codebooks; shape table is wrong")
    if channels == 2:
        # A fresh EnCodec's codebooks are zeros, so its audio does not depend on the codes at all; a stereo test
        # model needs audio that does, or a channel mix-up would go unseen.
        with torch.no_grad():
            for layer in model.audio_encoder.quantizer.layers:
                layer.codebook.embed.normal_()

    gen = model.generation_config
    gen.do_sample = True
    gen.guidance_scale = 3.0
    gen.top_k = 250
    gen.max_length = 1500
    gen.pad_token_id = s.codebook_size
    gen.bos_token_id = s.codebook_size
    gen.decoder_start_token_id = s.codebook_size
    model.save_pretrained(out)

    tokenizer = build_tokenizer(s.t5_vocab)
    processor = MusicgenProcessor(feature_extractor=EncodecFeatureExtractor(sampling_rate=32000), tokenizer=tokenizer)
    processor.save_pretrained(out)
    logger.info("wrote %s test model to %s", shape, out)
    return out


def cached_test_model(shape: str = "tiny", seed: int = 0) -> Path:
    """A test checkpoint under the user's cache directory, written on first use."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "radio" / "test-models"
    out = base / f"{shape}-seed{seed}"
    if not (out / "config.json").exists() or not any(out.glob("*.safetensors*")):
        logger.info("writing a random-weight %s checkpoint to %s (once)", shape, out)
        make_test_model(out, shape=shape, seed=seed)
    return out


class SineModel:
    """A fake :class:`~radio.musicgen.model.MusicModel`: a continuous sine across chunks, for engine tests.

    Codes carry the absolute frame index (so a continuation's position is read off its context), and the PCM
    of frame f is the sine at samples [f*640, (f+1)*640): chunks decoded with overlap line up exactly, and any
    repeated or missing sample at a join shows as a phase jump. ``delay`` makes it slower (seconds per call).
    ``channels=2``: stereo PCM (samples, 2), the right channel a sine at 1.5 times the frequency.
    """

    sample_rate = 32000
    frame_rate = 50
    samples_per_frame = 640
    num_codebooks = 4
    channels = 1

    batch_limit = 16
    vocab_size = 2048

    def __init__(self, freq: float = 440.0, amplitude: float = 0.5, delay: float = 0.0, channels: int = 1) -> None:
        self.channels = channels
        self.freq = freq
        self.amplitude = amplitude
        self.delay = delay
        self.calls: list[tuple[list, int]] = []  # (requests, frames) per batched call

    def pcm_for_frames(self, start: int, stop: int):  # -> np.ndarray
        import numpy as np

        n = np.arange(start * self.samples_per_frame, stop * self.samples_per_frame, dtype=np.float64)
        freqs = [self.freq, 1.5 * self.freq][: self.channels]
        pcm = np.stack([self.amplitude * np.sin(2 * np.pi * f * n / self.sample_rate) for f in freqs], axis=1)
        return (pcm[:, 0] if self.channels == 1 else pcm).astype(np.float32)

    def forget(self, key: str) -> None:
        """Nothing is kept per station."""

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> dict[str, str | int | None]:
        return {"device": "cpu", "decoder": "sine", "weights": "dense", "kernels": "numpy",
                "batch_limit": self.batch_limit,
                "decode_state_bytes": 0, "slots_used": None, "slot_bytes": None}

    def continue_batch(self, requests, frames: int):
        import time

        import numpy as np

        from ..musicgen.model import ContinuationResult

        self.calls.append((list(requests), frames))
        if self.delay:
            time.sleep(self.delay)
        results = []
        for r in requests:
            T = r.context.shape[1]
            start = int(r.context[0, -1]) + 1 if T else 0
            codes = np.tile(np.arange(start, start + frames, dtype=np.int64), (self.num_codebooks, 1))
            ov = r.decoded_overlap
            results.append(ContinuationResult(codes=codes, pcm=self.pcm_for_frames(start - ov, start + frames),
                                              overlap=ov))
        return results
