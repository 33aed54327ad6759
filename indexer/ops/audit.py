"""``mention-indexer audit``: compare the source, the read model and the caches; ``--repair`` what
differs (docs/audit.md, docs/commands.md).

Exit status: 0 when nothing differs (after a repair: when the audit after it finds nothing), 3
when something does, 2 for bad usage or configuration, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from indexer.audit import Options, Repair, Report, audit_and_repair, audit_with
from indexer.config import Settings
from indexer.errors import ConfigError
from indexer.redact import mask_url

DIFFERENT = 3


def main(settings: Settings, args: argparse.Namespace) -> int:
    """The ``audit`` command; errors propagate as ``IndexerError`` for the CLI to map."""
    if args.dry_run and not args.repair:
        raise ConfigError(
            "--dry-run says what --repair would do: use it with --repair (the audit itself changes nothing)"
        )
    options = Options.from_settings(settings, args.source_query, args.org or ())
    if args.repair:
        first, done, after = asyncio.run(audit_and_repair(options, settings, dry_run=args.dry_run))
    else:
        first, done, after = asyncio.run(audit_with(options, settings)), None, None
    final = after if after is not None else first
    if args.json:
        print(json.dumps(_as_json(first, done, after), sort_keys=False), flush=True)
    else:
        print("\n".join(_lines(settings, options, first, done, after)), flush=True)
    return 0 if final.clean else DIFFERENT


def _as_json(first: Report, done: Repair | None, after: Report | None) -> dict[str, Any]:
    out = first.as_json()
    if done is not None:
        out["repair"] = done.as_json()
        out["after"] = None if after is None else after.as_json()
    return out


def _lines(settings: Settings, options: Options, first: Report, done: Repair | None, after: Report | None) -> list[str]:
    scope = (
        f"organizations {', '.join(map(str, options.organizations))}" if options.organizations else "every organization"
    )
    lines = [
        f"audit of schema {settings.schema_name} at {mask_url(settings.database_url)} against"
        f" {mask_url(settings.source_url)}, {scope}:",
        *("  " + line for line in first.lines()),
    ]
    if done is not None:
        lines.append(done.line())
        if after is not None:
            lines += ["audit after the repair:", *("  " + line for line in after.lines())]
    elif not first.clean:
        lines.append("run `mention-indexer audit --repair` to bring them back (`--dry-run` first says how)")
    return lines
