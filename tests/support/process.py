"""``python -m indexer ...`` as a subprocess: the one implementation every process-level test uses.

A command or an indexer gets its whole environment from the caller (``clean_environment`` is the
outer one without any of the indexer's variables).  Nothing here imports ``indexer``: the
black-box suite (tests/blackbox/harness.py) uses it as it is; the in-repository suites build the
environment from a ``Settings`` first (tests/support/commands.py ``cli_env``,
tests/support/indexer_process.py).
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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]
OUR_VARIABLES = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(**extra: str) -> dict[str, str]:
    """The outer environment without any of ours (every setting at its default), plus ``extra``."""
    theirs = (*OUR_VARIABLES, *(f"{name}_FILE" for name in OUR_VARIABLES))
    env = {k: v for k, v in os.environ.items() if not (k in theirs or k.startswith(("INDEXER_", "OTEL_")))}
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "indexer", *args]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


def spawn(env: dict[str, str], *args: str, **popen: Any) -> subprocess.Popen[Any]:
    """``python -m indexer ARGS`` started in the repository, streams as ``popen`` says."""
    return subprocess.Popen(command(*args), env=env, cwd=ROOT, **popen)


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 30) -> Result:
    """``python -m indexer ARGS`` to its end: the real entry point, exit status and streams."""
    done = subprocess.run(command(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    return Result(done.returncode, done.stdout, done.stderr)


async def arun_cli(env: dict[str, str], *args: str, timeout_s: float = 30) -> Result:
    """``run_cli`` without blocking the event loop (an indexer may be running in it)."""
    return await asyncio.to_thread(run_cli, env, *args, timeout_s=timeout_s)


class Indexer:
    """``python -m indexer run ARGS`` as a subprocess; ``start`` again after a kill restarts it.

    Its output goes to ``log_path``, appended across restarts (each marked), whose tail is shown
    when something goes wrong.  The HTTP port is the environment's ``INDEXER_HTTP_PORT``.
    """

    def __init__(self, env: dict[str, str], log_path: Path, args: Iterable[str] = ()) -> None:
        self.env = dict(env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.args = list(args)
        self.log_path = log_path
        port = self.env.get("INDEXER_HTTP_PORT", "9180")
        self.port = int(port) if port.isdigit() else 0
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    # ---- life cycle ------------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30) -> Self:
        """Start it; unless told otherwise, wait until /readyz answers 200."""
        assert not self.running, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} =====\n".encode())
            log.flush()
            self.process = spawn(self.env, "run", *self.args, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # a Ctrl-C of pytest does not reach it
        if wait_ready:
            self.wait_http("/readyz", 200, timeout_s)
        return self

    async def start_ready(self, timeout_s: float = 30) -> None:
        """``start`` without blocking the event loop while it gets ready."""
        self.start(wait_ready=False)
        await self.wait_ready(timeout_s)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 15) -> tuple[int, float]:
        """SIGTERM and wait for the exit: (exit code, seconds it took).  Past ``timeout_s`` it is
        killed -9 and this fails (the default is above the 10 s the tests hold it to, so that
        their own assertion says how long it took)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"indexer did not exit within {timeout_s}s of SIGTERM\n{self.tail()}") from None
        return code, time.monotonic() - started

    def stop(self) -> None:
        """Cleanup: SIGTERM, then kill -9 if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    # ---- observation -----------------------------------------------------------------------

    def http(self, path: str) -> tuple[int, str] | None:
        """(status, body) of ``GET path``, or None if nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None

    def wait_http(self, path: str, status: int, timeout_s: float = 30) -> str:
        """Poll ``path`` until it answers ``status``; its body.  Fails (with the log tail) if the
        process exits or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise AssertionError(f"indexer exited with {self.process and self.process.returncode}\n{self.tail()}")
            last = self.http(path)
            if last is not None and last[0] == status:
                return last[1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never answered {status} within {timeout_s}s (last: {last})\n{self.tail()}")
            time.sleep(0.05)

    def readyz(self) -> tuple[int, dict[str, object]] | None:
        """(status, body) of /readyz, or None if nothing answers."""
        answer = self.http("/readyz")
        if answer is None:
            return None
        try:
            return answer[0], json.loads(answer[1] or "{}")
        except ValueError:
            return None

    async def wait_status(self, status: int, timeout_s: float = 30) -> dict[str, object]:
        """``wait_http("/readyz", status)`` without blocking the event loop; the body, parsed."""
        return json.loads(await asyncio.to_thread(self.wait_http, "/readyz", status, timeout_s) or "{}")

    async def wait_ready(self, timeout_s: float = 30) -> None:
        await self.wait_status(200, timeout_s)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, ``name`` or ``name{labels}`` → value."""
        answer = self.http("/metrics")
        assert answer is not None and answer[0] == 200, answer
        samples = {}
        for line in answer[1].splitlines():
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
