"""An embedded icecast2 on loopback, started from the repository's ``icecast.xml``.

Used by ``radio run --local-icecast`` and by the test suite. The template is copied into a private work
directory with the port, passwords and paths filled in; icecast2 runs as a child process and is stopped by
PID. As root, icecast2 refuses to run without ``<changeowner>``, so the copy names nobody/nogroup and the
work directory is made writable for them.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import IcecastError

logger = logging.getLogger(__name__)


def find_icecast_xml(explicit: str | None = None) -> Path:
    """The icecast.xml to start from: the given path, the repository's, or ./icecast.xml."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[2] / "icecast.xml",
                                                    Path.cwd() / "icecast.xml"]
    for c in candidates:
        if c.is_file():
            return c
    raise IcecastError(f"icecast.xml not found (looked in {', '.join(str(c) for c in candidates)}); "
                       "pass --icecast-xml PATH")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _set(parent: ET.Element, tag: str, value: str) -> ET.Element:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = value
    return el


def render_config(template: Path, workdir: Path, port: int, source_password: str, admin_password: str,
                  min_sources: int = 16, host: str = "127.0.0.1", as_root: bool | None = None,
                  extra: list[ET.Element] | None = None) -> Path:
    """Write a runnable copy of ``template`` into ``workdir`` and return its path."""
    try:
        root = ET.parse(template).getroot()
    except ET.ParseError as exc:
        raise IcecastError(f"{template}: not valid XML: {exc}") from exc
    limits = root.find("limits")
    if limits is None:
        limits = ET.SubElement(root, "limits")
    sources = limits.find("sources")
    text = (sources.text or "").strip() if sources is not None else ""
    current = int(text) if text.isdigit() else 2
    _set(limits, "sources", str(max(current, min_sources)))
    auth = root.find("authentication")
    if auth is None:
        auth = ET.SubElement(root, "authentication")
    _set(auth, "source-password", source_password)
    _set(auth, "relay-password", admin_password)
    _set(auth, "admin-user", "admin")
    _set(auth, "admin-password", admin_password)
    for sock in root.findall("listen-socket"):
        root.remove(sock)
    sock = ET.SubElement(root, "listen-socket")
    _set(sock, "port", str(port))
    _set(sock, "bind-address", host)
    _set(root, "hostname", host)
    paths = root.find("paths")
    if paths is None:
        paths = ET.SubElement(root, "paths")
    logdir = workdir / "log"
    logdir.mkdir(parents=True, exist_ok=True)
    _set(paths, "logdir", str(logdir))
    _set(paths, "pidfile", str(workdir / "icecast.pid"))
    for tag, default in (("basedir", "/usr/share/icecast2"), ("webroot", "/usr/share/icecast2/web"),
                         ("adminroot", "/usr/share/icecast2/admin")):
        el = paths.find(tag)
        if el is None or not Path(el.text or "").is_dir():
            _set(paths, tag, default)
    security = root.find("security")
    if security is None:
        security = ET.SubElement(root, "security")
    _set(security, "chroot", "0")
    owner = security.find("changeowner")
    if owner is not None:
        security.remove(owner)
    if as_root if as_root is not None else os.geteuid() == 0:
        blocked = [p for p in workdir.resolve().parents if not p.stat().st_mode & 0o001]
        if blocked:
            raise IcecastError(f"icecast2 runs as nobody when started by root, and cannot reach {workdir}: "
                               f"{blocked[0]} is not world-traversable; use a work directory under /tmp")
        owner = ET.SubElement(security, "changeowner")
        _set(owner, "user", "nobody")
        _set(owner, "group", "nogroup")
        for d in (workdir, logdir):
            d.chmod(0o777)
    for el in extra or []:
        root.append(el)
    out = workdir / "icecast.xml"
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    out.chmod(0o644)
    return out


# sh -c WATCHDOG icecast2 CONF FD: run icecast2 and stop it when FD reaches end of file (its writer is gone) or
# the shell is told to stop; the shell exits with icecast2's status.
_WATCHDOG = ('"$0" -c "$1" & pid=$!; '
             'trap \'kill -TERM "$pid" 2>/dev/null\' TERM INT; '
             '(read _ <&"$2"; kill -TERM "$pid" 2>/dev/null) & '
             'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; code=$?; done; '
             'kill $! 2>/dev/null; exit "${code:-1}"')


class LocalIcecast:
    """A private icecast2 process on loopback."""

    def __init__(self, template: Path | None = None, port: int | None = None, source_password: str | None = None,
                 admin_password: str | None = None, workdir: Path | None = None, min_sources: int = 16,
                 extra: list[ET.Element] | None = None) -> None:
        self.template = template or find_icecast_xml()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.source_password = source_password or secrets.token_urlsafe(12)
        self.admin_password = admin_password or secrets.token_urlsafe(12)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="radio-icecast-"))
        self.min_sources = min_sources
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._watch_w: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "LocalIcecast":
        binary = shutil.which("icecast2") or shutil.which("icecast")
        if binary is None:
            raise IcecastError("icecast2 is not installed; install it (apt-get install icecast2) or use --icecast "
                               "HOST:PORT for an existing server")
        conf = render_config(self.template, self.workdir, self.port, self.source_password, self.admin_password,
                             self.min_sources, self.host, extra=self.extra)
        # icecast2 runs under a small shell that holds the read end of a pipe whose write end only this process
        # has: when this process dies, however it dies (SIGKILL, the OOM killer), the pipe closes and the shell
        # stops icecast2, so no server outlives its daemon. (The kernel's parent-death signal would not do: it
        # is cleared when icecast2 changes its user.)
        watch_r, self._watch_w = os.pipe()
        try:
            self.proc = subprocess.Popen(["sh", "-c", _WATCHDOG, binary, str(conf), str(watch_r)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                         pass_fds=(watch_r,))
        finally:
            os.close(watch_r)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else "").strip()
                raise IcecastError(f"icecast2 exited with code {self.proc.returncode} on port {self.port}: "
                                   f"{err or self.error_log_tail()}")
            if self.status() is not None:
                logger.info("local Icecast up at %s (pid %d)", self.url, self.proc.pid)
                return self
            time.sleep(0.1)
        self.stop()
        raise IcecastError(f"icecast2 did not answer on {self.url} within {timeout:.0f}s: {self.error_log_tail()}")

    def status(self) -> dict | None:
        """status-json.xsl as a dict, or None while Icecast does not answer."""
        return fetch_status(self.url)

    def error_log_tail(self, lines: int = 5) -> str:
        log = self.workdir / "log" / "error.log"
        try:
            return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if self._watch_w is not None:
            os.close(self._watch_w)
            self._watch_w = None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalIcecast":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def fetch_status(base_url: str) -> dict | None:
    """An Icecast's status-json.xsl as a dict; None when it does not answer (or answers half-written JSON)."""
    try:
        with urllib.request.urlopen(f"{base_url}/status-json.xsl", timeout=2) as resp:
            return json.loads(resp.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def mounts(status: dict | None) -> dict[str, dict]:
    """Mount path -> source entry from a status-json.xsl document (Icecast gives one dict or a list)."""
    if not status:
        return {}
    sources = status.get("icestats", {}).get("source", [])
    if isinstance(sources, dict):
        sources = [sources]
    out = {}
    for src in sources:
        url = src.get("listenurl", "")
        mount = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else url
        out[mount] = src
    return out
