"""The shipped nginx recipe, run for real: HTTPS with a self-signed certificate, CORS, unbuffered streams."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import radio
from radio.output.local import free_port

from ..conftest import listen, mount_info, run_daemon, wait_for, write_station

pytestmark = pytest.mark.e2e

RECIPE = Path(radio.__file__).parent / "deploy" / "nginx.conf"
INSECURE = ssl._create_unverified_context()  # the test's own self-signed certificate


def https(url: str, method: str = "GET", headers: dict[str, str] | None = None,
          body: bytes | None = None, read: int = 4096) -> tuple[int, dict[str, list[str]], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        resp = urllib.request.urlopen(req, context=INSECURE, timeout=10)
    except urllib.error.HTTPError as err:
        resp = err
    with resp:
        data = resp.read(read) if method != "HEAD" else b""
        headers_seen: dict[str, list[str]] = {}
        for k, v in resp.headers.items():
            headers_seen.setdefault(k.lower(), []).append(v)
        return resp.status, headers_seen, data


def recipe_for_test(tmp: Path, port: int, icecast_port: int, api_port: int) -> str:
    """The shipped file with only its addresses and certificate paths changed; each edit must apply."""
    text = RECIPE.read_text(encoding="utf-8")
    edits = [
        (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{icecast_port};"),
        (r"server 127\.0\.0\.1:8765;", f"server 127.0.0.1:{api_port};"),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        (r"listen \[::\]:443 ssl;\n", ""),
        (r"/etc/ssl/radio/fullchain\.pem", str(tmp / "cert.pem")),
        (r"/etc/ssl/radio/privkey\.pem", str(tmp / "key.pem")),
    ]
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text)
        assert n == 1, f"the recipe no longer has {pattern!r}"
    return text


@pytest.fixture
def nginx(tmp_path_factory: pytest.TempPathFactory):
    """Start nginx from the recipe; yields a function (icecast_port, api_port) -> https base URL."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.fail("nginx is not installed (apt-get install nginx)")
    # under /tmp, world-readable: as root, nginx's workers run as nobody
    tmp = tmp_path_factory.mktemp("nginx")
    tmp.chmod(0o777)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
    procs: list[subprocess.Popen] = []

    def start(icecast_port: int, api_port: int) -> str:
        port = free_port()
        (tmp / "radio.conf").write_text(recipe_for_test(tmp, port, icecast_port, api_port), encoding="utf-8")
        temp = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                             "scgi"))
        (tmp / "nginx.conf").write_text(
            f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nworker_processes 1;\nevents {{}}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {tmp}/radio.conf;\n}}\n", encoding="utf-8")
        check = subprocess.run([binary, "-t", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen([binary, "-c", str(tmp / "nginx.conf"), "-p", str(tmp), "-g", "daemon off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        base = f"https://127.0.0.1:{port}"
        wait_for(lambda: _up(base), 10, message="nginx answering")
        return base

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def _up(base: str) -> bool:
    try:
        https(f"{base}/status", method="HEAD")
        return True
    except OSError:
        return False


def test_nginx_recipe_serves_streams_player_and_api_over_https_with_cors(icecast, nginx, tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "a.yaml", "name: A\nmount: /a.mp3\nformat: mp3\nplaylist:\n"
                                "  - {title: Over TLS, prompt: calm piano, duration: 10m}\n")
    write_station(st, "b.yaml", "name: B\nmount: /b.ogg\nformat: vorbis\nplaylist:\n"
                                "  - {title: Also TLS, prompt: soft pads, duration: 10m}\n")
    api_port = free_port()
    daemon = run_daemon(icecast, tiny_model_dir, st, api_port=api_port, token="proxy-test-token")
    try:
        base = nginx(icecast.port, api_port)
        wait_for(lambda: mount_info(icecast, "/a.mp3") and mount_info(icecast, "/b.ogg"), 20, message="on air")
        origin = {"Origin": "https://player.example.com"}

        # A listener decodes each mount over HTTPS.
        for mount in ("/a.mp3", "/b.ogg"):
            audio = listen(f"{base}/stream{mount}", 3.0)
            assert len(audio) >= 3.0 * 16000 * 0.99
            assert np.sqrt(np.mean(audio ** 2)) > 0.005, mount

        # The stream: CORS headers once each, nothing buffered (bytes arrive at once, and keep arriving).
        status, headers, data = https(f"{base}/stream/a.mp3", headers=origin, read=8192)
        assert status == 200 and len(data) == 8192
        assert headers["access-control-allow-origin"] == ["*"]
        assert "icy-name" in headers["access-control-expose-headers"][0]
        assert headers["content-type"] == ["audio/mpeg"]

        # The API and the web player through the proxy: CORS too; preflight answered; writes need the token.
        status, headers, data = https(f"{base}/status", headers=origin, read=1 << 20)
        assert status == 200 and b'"/a.mp3"' in data
        assert headers["access-control-allow-origin"] == ["*"]
        status, headers, data = https(f"{base}/", read=1 << 20)
        assert status == 200 and b"<title>radio</title>" in data
        status, headers, _ = https(f"{base}/stations/a.mp3/skip", method="OPTIONS",
                                   headers={**origin, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization"})
        assert status == 204 and "Authorization" in headers["access-control-allow-headers"][0]
        assert headers["access-control-allow-origin"] == ["*"]
        status, headers, _ = https(f"{base}/stations/a.mp3/skip", method="POST", body=b"{}", headers=origin)
        assert status == 401 and headers["access-control-allow-origin"] == ["*"]
        status, headers, data = https(f"{base}/stations/a.mp3/skip", method="POST", body=b"{}",
                                      headers={**origin, "Authorization": "Bearer proxy-test-token"}, read=1 << 20)
        assert status in (200, 202) and headers["access-control-allow-origin"] == ["*"]  # applied, or pending

        # Icecast's own <http-headers> from the shipped icecast.xml, for direct listeners.
        with urllib.request.urlopen(urllib.request.Request(f"{icecast.url}/a.mp3", headers=origin), timeout=10) as r:
            assert r.headers.get_all("Access-Control-Allow-Origin") == ["*"]
            assert "icy-name" in (r.headers.get("Access-Control-Expose-Headers") or "")
    finally:
        daemon.stop()
