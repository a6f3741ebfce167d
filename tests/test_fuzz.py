"""Hostile station files: never a traceback, always `path:line: key: message`, exit 2."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from radio.cli import main
from radio.config import load_station
from radio.errors import ConfigError

VALID = """\
name: Fuzz Station
mount: /fuzz.mp3
format: vorbis
bitrate: 128
description: Piano, rain and vinyl
genre: lofi
order: shuffle
generation: {temperature: 1.0, top_k: 250, guidance: 3.0}
playlist:
  - title: Rainy piano
    prompt: lofi hip hop, rainy night piano
    duration: 3m
  - title: Warm keys
    prompt: mellow rhodes chords
    duration: 90s
    transition: {blend: 8s}
"""

LINE = re.compile(r"^.+:\d+: [\w.\[\]?]+: \S.*$")


def mutations(rng: random.Random) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    raw = VALID.encode()
    for i in range(40):  # random truncations
        out.append((f"trunc{i}", raw[: rng.randrange(1, len(raw) - 20)]))
    values = ["[]", "{}", "null", "true", "-1", "1e999", "0x10", "'3 parsecs'", "[1, [2, [3]]]", "{a: b}",
              "\"\\u0000\"", "!!binary aGVsbG8=", "!!python/object:os.system {}", "&a [*a]", "'" + "x" * 5000 + "'"]
    keys = ["name", "mount", "format", "bitrate", "order", "generation", "playlist", "description"]
    for i in range(40):  # wrong types and hostile scalars at random keys
        key, value = rng.choice(keys), rng.choice(values)
        text = re.sub(rf"(?m)^{key}:.*$", lambda _m: f"{key}: {value}", VALID)
        out.append((f"type{i}", text.encode()))
    for i in range(10):  # binary junk, alone or spliced in
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        at = rng.randrange(len(raw))
        out.append((f"junk{i}", junk if i % 2 else raw[:at] + junk + raw[at:]))
    out.append(("deep", (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n")))
    out.append(("deepmap", ("".join("  " * d + f"k{d}:\n" for d in range(200)) + "  " * 200 + "v: 1\n").encode()))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join('*' + p for _ in range(10))}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    out.append(("bomb", bomb.encode()))
    out.append(("huge_prompt", VALID.replace("mellow rhodes chords", "x" * 50_000).encode()))
    out.append(("big_file", (VALID + "#" + "y" * 300_000 + "\n").encode()))
    out.append(("many_items", (VALID + "".join("  - {prompt: p, duration: 1}\n" for _ in range(1200))).encode()))
    out.append(("not_utf8", "name: Café\n".encode("latin-1") + raw))
    out.append(("list_root", b"- a\n- b\n"))
    out.append(("scalar_root", b"just a string\n"))
    out.append(("empty", b""))
    out.append(("tabs", b"name:\tx\n\tmount: /x\n"))
    return out


def test_fuzzed_station_files_give_located_errors_never_tracebacks(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(1234)
    cases = mutations(rng)
    for name, data in cases:
        (tmp_path / f"{name}.yaml").write_bytes(data)
    code = main(["check", str(tmp_path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert code == 2
    lines = captured.out.splitlines()
    bad = [line for line in lines if not LINE.match(line)]
    assert not bad, bad[:5]
    for name, data in cases:
        path = tmp_path / f"{name}.yaml"
        try:
            load_station(path)
        except ConfigError:
            assert any(line.startswith(f"{path}:") for line in lines), f"{name}: no located error"
        # (a mutation that is still a valid station is fine: it is simply not reported)
    for expected in ("bomb", "deep", "huge_prompt", "big_file", "many_items", "not_utf8", "empty"):
        assert any(line.startswith(f"{tmp_path / expected}.yaml:") for line in lines), expected
