"""Scale-out topology: an Icecast relay of the daemon's Icecast serves the same station to more listeners."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from radio.config import load_stations
from radio.daemon import Daemon
from radio.output.local import LocalIcecast

from ..conftest import daemon_config, listen, mount_info, wait_for, write_station

pytestmark = pytest.mark.e2e


def relay_element(port: int, mount: str) -> ET.Element:
    relay = ET.Element("relay")
    for tag, value in (("server", "127.0.0.1"), ("port", str(port)), ("mount", mount), ("local-mount", mount),
                       ("on-demand", "0"), ("relay-shoutcast-metadata", "1")):
        ET.SubElement(relay, tag).text = value
    return relay


def test_two_daemons_feed_one_icecast_and_a_relay_serves_listeners(icecast, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    daemons = []
    # Two daemons (as on two GPUs), each owning some stations, feeding the same Icecast.
    for i, (mount, fmt) in enumerate((("/one.mp3", "mp3"), ("/two.ogg", "vorbis"))):
        st = tmp_path / f"stations{i}"
        write_station(st, "s.yaml", f"name: S{i}\nmount: {mount}\nformat: {fmt}\nplaylist:\n"
                                    f"  - {{title: T{i}, prompt: p{i}, duration: 10m}}\n")
        stations, _ = load_stations([st])
        d = Daemon(daemon_config(icecast, tiny_model_dir, st), stations)
        d.start()
        daemons.append(d)
    relay = LocalIcecast(extra=[relay_element(icecast.port, "/one.mp3"), relay_element(icecast.port, "/two.ogg")])
    try:
        wait_for(lambda: mount_info(icecast, "/one.mp3") and mount_info(icecast, "/two.ogg"), 20,
                 message="both daemons on air")
        relay.start()
        wait_for(lambda: mount_info(relay, "/one.mp3") and mount_info(relay, "/two.ogg"), 20,
                 message="relay mounts up")
        for mount in ("/one.mp3", "/two.ogg"):
            audio = listen(f"{relay.url}{mount}", 4.0)
            assert len(audio) >= 4 * 16000 * 0.99
            assert np.sqrt(np.mean(audio ** 2)) > 0.005, mount
    finally:
        relay.cleanup()
        for d in daemons:
            d.stop()
