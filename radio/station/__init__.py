"""One station's runtime state: ``playlist`` cursor and ``station`` (code context, PCM buffer with join tails,
filler and now-playing marks), ``idents`` (station idents read with pydub), ``dsp`` (crossfades, levels). It
neither reads YAML nor calls a model."""
