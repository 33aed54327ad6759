"""The container's health check (Docker HEALTHCHECK): liveness, not readiness.

It asks ``/healthz`` on the port the indexer was configured with: ``INDEXER_HTTP_PORT``, read at
check time (default 9180, the default of ``Settings.http_port``).  Set the port with the variable,
not with ``--http-port``: the check cannot see a command-line flag.

``INDEXER_HTTP_PORT=0`` turns the indexer's HTTP server off, so there is nothing to ask: the check
then reports healthy for as long as PID 1 (the indexer) lives, instead of failing forever.

Readiness (``/readyz``: Postgres, Redis and RabbitMQ answering, a consumer registered) is not
checked here on purpose: a broker outage must not mark the container unhealthy, or an orchestrator
that restarts unhealthy containers would restart every indexer during it.

Standard library only.  Exit status 0 = healthy, 1 = unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 9180
TIMEOUT_S = 2.0


def _pid_1_lives() -> bool:
    try:
        os.kill(1, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just is not ours to signal
    return True


def main() -> int:
    raw = os.environ.get("INDEXER_HTTP_PORT", "").strip() or str(DEFAULT_PORT)
    try:
        port = int(raw)
    except ValueError:
        print(f"healthcheck: INDEXER_HTTP_PORT is not a port number: {raw!r}", file=sys.stderr)
        return 1
    if port == 0:
        return 0 if _pid_1_lives() else 1
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
