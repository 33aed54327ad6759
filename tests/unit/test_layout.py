"""What the package layout promises to the services that import a part of it."""

from __future__ import annotations

import subprocess
import sys


def test_the_reader_side_cache_helper_imports_only_redis() -> None:
    code = (
        "import sys; from indexer.cache import AsyncCacheReader, CacheReader; "
        "heavy = sorted(m for m in ('aio_pika', 'aiormq', 'psycopg', 'pydantic', 'prometheus_client', 'google.protobuf')"
        " if m in sys.modules); print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "", f"importing indexer.cache imported {done.stdout.strip()}"
