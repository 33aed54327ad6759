"""``python -m indexer run`` as a real subprocess: start, wait until ready, kill -9, SIGTERM.

The environment is built from a ``Settings`` (every field under its variable name), with a free
``INDEXER_HTTP_PORT`` so ``/readyz`` can be polled.  Output goes to a file, appended across
restarts, whose tail is shown when something goes wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from indexer.config import Settings

_OUR_VARIABLES = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(settings: Settings, http_port: int) -> dict[str, str]:
    """The process environment: ours minus every indexer variable, plus the settings'."""
    env = {k: v for k, v in os.environ.items() if not (k in _OUR_VARIABLES or k.startswith("INDEXER_"))}
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        env[str(info.validation_alias)] = str(value)
    env["INDEXER_HTTP_PORT"] = str(http_port)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class IndexerProcess:
    """One indexer; ``start`` again after a kill to restart it with the same settings."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.http_port = free_port()
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        assert not self.running, "already running"
        self.starts += 1
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== start #{self.starts} =====\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "indexer", "run"],
            env=environment(self.settings, self.http_port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of pytest does not reach it; we stop it ourselves
        )

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """kill -9 and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait(10)
        self._closed_log()

    def terminate(self, timeout_s: float = 30) -> tuple[int, float]:
        """SIGTERM; wait for the exit; (exit code, seconds it took).  kill -9 after ``timeout_s``."""
        assert self._process is not None
        started = time.monotonic()
        self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"indexer did not exit within {timeout_s}s of SIGTERM\n{self.tail()}") from None
        elapsed = time.monotonic() - started
        self._closed_log()
        return code, elapsed

    def stop(self) -> None:
        """Cleanup: SIGTERM, then kill -9 if it lingers."""
        if self._process is None or self._process.poll() is not None:
            self._closed_log()
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
        self._closed_log()

    def _closed_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---- observation -----------------------------------------------------------------------

    def readyz(self) -> tuple[int, dict[str, object]] | None:
        """(status, body) of /readyz, or None if nothing answers."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels plus ``name{labels}`` ones, as floats."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def rss_bytes(self) -> int:
        """Resident set size of the process, from /proc (Linux)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    async def wait_status(self, status: int, timeout_s: float = 30) -> dict[str, object]:
        """Poll /readyz until it answers ``status``; fail (with the log tail) if the process exits."""
        deadline = time.monotonic() + timeout_s
        last: tuple[int, dict[str, object]] | None = None
        while True:
            if not self.running:
                raise AssertionError(f"indexer exited with {self._process.returncode if self._process else None}\n{self.tail()}")
            last = await asyncio.to_thread(self.readyz)
            if last is not None and last[0] == status:
                return last[1]
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz never answered {status} within {timeout_s}s (last: {last})\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, timeout_s: float = 30) -> None:
        await self.wait_status(200, timeout_s)

    async def start_ready(self, timeout_s: float = 30) -> None:
        self.start()
        await self.wait_ready(timeout_s)
