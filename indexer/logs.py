"""Log setup: readable text on a terminal, one JSON object per line for log pipelines.

``INDEXER_LOG_FORMAT=auto`` (the default) picks JSON when stderr is not a terminal, as under an
orchestrator.  Fields passed as ``extra=`` (a dead letter's reason, routing key, event id) become
keys of the JSON object and ``key=value`` pairs of the text line.  Every message and traceback is
scrubbed of passwords on the way out, whatever library wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from indexer.redact import scrub

# What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        entry.update(
            {key: scrub(str(value)) if isinstance(value, str) else value for key, value in _extra(record).items()}
        )
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _extra(record)
        if fields:
            text += " " + " ".join(f"{key}={value!r}" for key, value in fields.items())
        return scrub(text)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    json_lines = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every failed connect at ERROR with a traceback; our own line (service retry,
    # or the command's exit message) already says which service and URL, with the password masked.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))
