"""Coverage-guided fuzzing (atheris) of what a delivery's bytes go through before any I/O: the
codec (body and content type) and the header table the dead letter writes back.

    .venv/bin/pip install atheris            # or: pip install -e '.[fuzz]'
    .venv/bin/python bench/fuzz_codec.py -atheris_runs=200000 [-max_len=4096] [corpus_dir]

Properties, each a crash when broken:
* ``wire.decode`` answers a change, a refresh or ``Ignored``, or raises ``Refused`` with a one-line
  reason: any other exception is a crash;
* a header table pamqp decodes from any bytes is written back (``ingest.fieldtable``) to bytes
  that decode to the same values.
Prints the number of runs and outcomes at the end.  Every crash it finds becomes a regression
test in tests/unit.
"""

from __future__ import annotations

import collections
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support
from tests.support.deliveries import same  # noqa: E402  (after the path it needs)

with atheris.instrument_imports():
    from pamqp import decode

    from indexer.errors import Refused
    from indexer.ingest import wire
    from indexer.ingest.fieldtable import Unencodable, encode_table

CONTENT_TYPES = [None, "", wire.CONTENT_TYPE, "application/octet-stream", "application/json", "text/plain"]
outcomes: collections.Counter[str] = collections.Counter()


def one(data: bytes) -> None:
    # One byte of content type, one of table length, the table, then the body.
    if len(data) < 2:
        return
    content_type = CONTENT_TYPES[data[0] % len(CONTENT_TYPES)]
    table_bytes = data[2 : 2 + data[1]]
    body = data[2 + data[1] :]
    try:
        decoded = wire.decode(body, content_type, max_bytes=1 << 20)
        outcomes[type(decoded).__name__] += 1
    except Refused as refusal:
        assert refusal.reason and "\n" not in refusal.reason
        outcomes["refused"] += 1
    try:
        _, table = decode.field_table(struct.pack(">I", len(table_bytes)) + table_bytes)
    except Exception:  # not a table pamqp reads: such a delivery never reaches us
        outcomes["table unreadable"] += 1
        return
    try:
        written = encode_table(table)
    except Unencodable:
        outcomes["table unencodable (dead letter without its headers)"] += 1
        return
    _, back = decode.field_table(written)
    assert same(back, table), (table, back)
    outcomes["table kept"] += 1


def _seed_corpus() -> str:
    """A corpus of valid deliveries to start from (random bytes alone seldom get past the parser)."""
    from datetime import UTC, datetime

    from indexer.changes import Kind
    from indexer.events import job_pb2, trigger_pb2

    folder = tempfile.mkdtemp(prefix="fuzz-codec-")
    at = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    bodies = [wire.encode(wire.build_event(wire.mention_message(kind, 7, 3, at, at))) for kind in Kind]
    bodies += [wire.encode(wire.build_event(trigger_pb2.TriggerCacheRefresh(), organization_id="5"))]
    bodies += [wire.encode(wire.build_event(job_pb2.JobCreated()))]
    headers = encode_table({"d": 0.1, "n": {"l": [1, "x", None]}, "t": True})[4:]
    for number, body in enumerate(bodies):
        for prefix in (bytes([2, 0]), bytes([2, len(headers)]) + headers):  # content type, table, body
            with open(os.path.join(folder, f"seed{number}-{len(prefix)}"), "wb") as seed:
                seed.write(prefix + body)
    return folder


def main() -> None:
    argv = sys.argv if any(not arg.startswith("-") for arg in sys.argv[1:]) else [*sys.argv, _seed_corpus()]
    atheris.Setup(argv, one)
    try:
        atheris.Fuzz()
    finally:  # atheris exits the process at the end of its runs
        print(f"fuzz_codec: {sum(outcomes.values())} outcomes: {dict(outcomes)}", flush=True)


if __name__ == "__main__":
    main()
