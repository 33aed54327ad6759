"""A certificate authority and TLS servers of the test's own: Redis and Postgres on free ports in
temporary folders, started by the test and removed afterwards (the machine's services are never
touched).  Certificates are made with the ``openssl`` command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.process import free_port
from tests.support.waiting import eventually_sync


@dataclass(frozen=True)
class Authority:
    """A CA, and a server certificate it signed for ``localhost`` / ``127.0.0.1``."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def server(self, name: str, hosts: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path]:
        """(certificate, key) for ``hosts`` (subjectAltName), signed by this CA."""
        key, csr, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(f"subjectAltName={hosts}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.folder / "ca.key", "-CAcreateserial",
                 "-out", cert, "-days", "2", "-extfile", extensions)
        return cert, key


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def authority(folder: Path) -> Authority:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "ca.key", "-out", folder / "ca.pem",
             "-days", "2", "-subj", "/CN=mention-indexer test CA")
    return Authority(folder)


@contextmanager
def redis_tls(folder: Path, cert: Path, key: Path, ca: Path) -> Iterator[int]:
    """A Redis answering only TLS on the returned port."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        eventually_sync(
            lambda: subprocess.run(["redis-cli", "--tls", "--cacert", str(ca), "-p", str(port), "ping"],
                                   capture_output=True, text=True, timeout=5).stdout.strip() == "PONG",
            timeout_s=15, what="redis over TLS",
        )
        yield port
    finally:
        server.kill()
        server.wait(10)


def _as_postgres(*args: str) -> list[str]:
    """Postgres refuses to run as root: run it as the machine's postgres user."""
    if os.geteuid() != 0:
        return list(args)
    return ["runuser", "-u", "postgres", "--", *args]


@contextmanager
def postgres_tls(cert: Path, key: Path) -> Iterator[int]:
    """A throw-away Postgres cluster with ``ssl=on`` on the returned port, trust authentication."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb is None or postgres is None:
        pytest.skip("the Postgres server binaries (initdb, postgres) are not installed")
    folder = Path(tempfile.mkdtemp(prefix="indexer-pg-tls-"))  # not under pytest's root-only tmp_path
    data = folder / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        subprocess.run(_as_postgres(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
                       check=True, capture_output=True, timeout=120)
        for source, name in ((cert, "server.crt"), (key, "server.key")):
            shutil.copy(source, data / name)
            if os.geteuid() == 0:
                shutil.chown(data / name, "postgres", "postgres")
            (data / name).chmod(0o600)
        port = free_port()
        server = subprocess.Popen(
            _as_postgres(postgres, "-D", str(data), "-p", str(port), "-k", str(folder), "-c", "listen_addresses=127.0.0.1",
                         "-c", "ssl=on", "-c", "fsync=off", "-c", "shared_buffers=16MB"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require"
            eventually_sync(lambda: _answers(url), timeout_s=30, what="postgres over TLS")
            yield port
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # smart shutdown; kill if it lingers
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
