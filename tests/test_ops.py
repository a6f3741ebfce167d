"""Operations files: the systemd unit verifies, the Docker entry command checks stations, icecast.xml is sane."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not available on this machine")
    radio = Path(sys.executable).with_name("radio")
    text = (REPO / "radio.service").read_text()
    # the unit names the install location; point it at this checkout's venv so the binaries exist
    text = text.replace("/opt/radio/.venv/bin/radio", str(radio)).replace("WorkingDirectory=/opt/radio",
                                                                            f"WorkingDirectory={tmp_path}")
    unit = tmp_path / "radio.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "radio.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    for needed in ("Restart=on-failure", "User=radio", "After=network-online.target", "EnvironmentFile=",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload="):
        assert needed in text, needed


def test_docker_entry_command_refuses_bad_stations(tmp_path: Path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    entry = re.search(r'^ENTRYPOINT (\[.*\])$', dockerfile, re.M)
    assert entry, "no ENTRYPOINT"
    argv = json.loads(entry.group(1))
    assert argv[:2] == ["sh", "-c"] and "radio check /stations" in argv[2]
    bin_dir = Path(sys.executable).parent
    # run the entry command as the image would, with /stations mapped to a test directory
    def run(stations: Path) -> subprocess.CompletedProcess[str]:
        script = argv[2].replace("/stations", str(stations)).replace("exec radio run", "exec echo would-run")
        return subprocess.run(["sh", "-c", script, *argv[3:], "--icecast", "icecast:8000"], capture_output=True,
                              text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    good = run(REPO / "stations")
    assert good.returncode == 0 and "would-run" in good.stdout, good.stderr
    bad_dir = tmp_path / "stations"
    bad_dir.mkdir()
    (bad_dir / "bad.yaml").write_text("name: x\nmount: nope\nplaylist: []\n")
    bad = run(bad_dir)
    assert bad.returncode == 2 and "would-run" not in bad.stdout
    assert f"{bad_dir / 'bad.yaml'}:2: mount:" in bad.stdout


def test_shipped_icecast_xml_is_usable() -> None:
    root = ET.parse(REPO / "icecast.xml").getroot()
    assert int(root.findtext("limits/sources")) >= 16
    assert int(root.findtext("limits/source-timeout")) >= 10
    headers = {h.get("name"): h.get("value") for h in root.findall("http-headers/header")}
    assert headers.get("Access-Control-Allow-Origin") == "*"
    assert "Access-Control-Expose-Headers" in headers
    assert root.find("security/changeowner") is not None


def test_compose_runs_icecast_and_the_daemon_with_the_example_stations() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert services["icecast"]["build"]["target"] == "icecast"
    radio = services["radio"]
    assert radio["build"]["target"] == "radio" and "icecast" in radio["depends_on"]
    assert radio["command"][:2] == ["--icecast", "icecast:8000"]
    assert "./stations:/stations:ro" in radio["volumes"]
    assert any(v.endswith(":/cache") for v in radio["volumes"])  # the Hugging Face cache is a volume
    assert "RADIO_API_TOKEN" in radio["environment"]  # the API binds beyond loopback: a token is required
    targets = re.findall(r"^FROM \S+ AS (\w+)", (REPO / "Dockerfile").read_text(), re.M)
    assert {"icecast", "radio"} <= set(targets)
