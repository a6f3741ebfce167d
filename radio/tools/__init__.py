"""Tools beside the daemon, never on its hot path: ``bench``, ``soak``, random-weight checkpoints and shared
fakes (``testing``)."""

SHAPES = ("tiny", "tiny-alt", "tiny-stereo", "small", "small-stereo", "medium", "large")  # make-test-model's shapes (cheap to import for argv)
