"""The filler history's ring buffer keeps exactly the last samples, whatever the block sizes."""

from __future__ import annotations

import numpy as np

from radio.station.dsp import Ring


def test_ring_keeps_the_newest_samples_in_order_through_pushes_and_drops() -> None:
    ring, ref = Ring(10), np.zeros(0, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(500):
        if rng.random() < 0.2 and len(ref):
            k = int(rng.integers(0, len(ref) + 1))
            ring.drop_newest(k)
            ref = ref[: len(ref) - k]
        else:
            block = rng.random(int(rng.integers(0, 25))).astype(np.float32)
            ring.push(block)
            ref = np.concatenate([ref, block])[-10:]
        assert len(ring) == len(ref)
        np.testing.assert_array_equal(ring.samples(), ref)
    buf = ring.buf
    ring.push(np.ones(7, np.float32))
    assert ring.buf is buf  # written in place
