"""Each mount's encoder normalises loudness to its station's target (EBU R128, measured by ffmpeg)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from radio.output.encoder import ffmpeg_argv

from ..conftest import mount_info, run_daemon, wait_for, write_station

pytestmark = pytest.mark.e2e


def integrated_loudness(url: str, seconds: float) -> float:
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-i", url, "-t", str(seconds), "-af", "ebur128",
                           "-f", "null", "-"], capture_output=True, text=True, timeout=seconds + 30)
    summary = proc.stderr[proc.stderr.rfind("Summary:"):]
    match = re.search(r"I:\s+(-?[\d.]+) LUFS", summary)
    assert match, proc.stderr[-1500:]
    return float(match.group(1))


def test_mounts_are_normalised_to_their_target(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "quiet.yaml", "name: Q\nmount: /quiet.mp3\nloudness: -26\nplaylist:\n"
                                    "  - {prompt: calm piano, duration: 10m}\n")
    write_station(st, "loud.yaml", "name: L\nmount: /loud.ogg\nformat: vorbis\nloudness: -14\nplaylist:\n"
                                   "  - {prompt: calm piano, duration: 10m}\n")
    daemon = run_daemon(icecast, tiny_model_dir, st)
    try:
        wait_for(lambda: mount_info(icecast, "/quiet.mp3") and mount_info(icecast, "/loud.ogg"), 20, message="on air")
        quiet = integrated_loudness(f"{icecast.url}/quiet.mp3", 12)
        loud = integrated_loudness(f"{icecast.url}/loud.ogg", 12)
    finally:
        daemon.stop()
    assert abs(quiet - -26) <= 2.5, quiet
    assert abs(loud - -14) <= 2.5, loud


def test_loudness_off_leaves_the_filter_out() -> None:
    assert "-af" not in ffmpeg_argv("mp3", 128, 32000, loudness=None)
    argv = ffmpeg_argv("opus", 96, 32000, loudness=-16)
    assert argv[argv.index("-af") + 1] == "loudnorm=I=-16:TP=-1.5:LRA=11,aresample=48000,aformat=channel_layouts=mono"
