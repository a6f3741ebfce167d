"""The model wing: MusicGen loading, precision and device policy, text conditioning, the two decode paths and
EnCodec decoding, behind the :class:`~radio.musicgen.model.MusicModel` protocol the engine uses.

- ``model``: ``MusicgenModel`` (``from_pretrained``, dtype/device policy, the text cache, ``continue_batch``)
  and the ``MusicModel`` protocol;
- ``decoding``: the delay pattern and the *dynamic* KV layout (chunk-sized contiguous buffers; CPU);
- ``slots``: the *static* layout (one fixed KV slot per station) and its chunk loop with CUDA graphs;
- ``step``: the static path's decode step and sampling, one function with fixed shapes;
- ``kernels``: oneDNN-packed linear layers for CPUs.

It knows nothing of stations, playlists or Icecast.
"""
