"""The model wing: MusicGen loading, precision and device policy, text conditioning, the two decode paths and
EnCodec decoding, behind the :class:`~radio.musicgen.types.MusicModel` protocol the engine uses.

- ``types``: the contract (``ContinuationRequest``, ``ContinuationResult``, ``MusicModel``); no torch;
- ``model``: ``MusicgenModel``, the facade (``from_pretrained``, dtype/device/weights policy, picks the path);
- ``pattern``: the delay pattern (mono and stereo), one object;
- ``text``: text conditioning (prompt cache, blends, the rows' cross-attention states);
- ``plan``: THE chunk plan (which rows continue, which are prefilled, how many steps), for both paths;
- ``prefill``: fresh rows' contexts through transformers' decoder, per-row positions;
- ``step``: THE decode step's layers over either KV layout (``row_logits``: the dynamic layout; ``decode_step``:
  the slots), with ``sampling`` (guidance, temperature, top-k) shared by both;
- ``dynamic`` + ``decoding``: the CPU's chunk loop and its chunk-sized KV buffers;
- ``slots``: the GPU's fixed KV slots and their chunk loop with CUDA graphs (``fused``: its kernels);
- ``codec``: EnCodec decoding and its memory policy; ``kernels``: packed and quantized CPU linear layers.

It knows nothing of stations, playlists or Icecast.
"""
