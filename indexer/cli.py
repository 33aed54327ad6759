"""The ``mention-indexer`` command line.  Nothing imports this module.

Exit status: 0 success; 2 bad usage or configuration; 1 a failure at run time, with a
message naming the service and its URL (password masked); 3 (``audit``) a difference found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from indexer import tracing
from indexer.config import Settings, load_settings, variable
from indexer.errors import ConfigError, IndexerError
from indexer.ids import InvalidId, parse_id
from indexer.logs import configure_logging
from indexer.redact import mask_url, scrub

log = logging.getLogger("indexer.cli")
_SETTING = "setting_"  # argparse dest prefix of the flags made from the settings model


def flag_of(field_name: str) -> str:
    """``INDEXER_BATCH_WAIT_MS`` → ``--batch-wait-ms``, ``DATABASE_URL`` → ``--database-url``."""
    return "--" + variable(field_name).removeprefix("INDEXER_").lower().replace("_", "-")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after its variable, with the model's description as help.

    Values stay text here: the model converts and validates them, so a bad flag and a bad
    variable get the same message."""
    group = parser.add_argument_group("settings", "each flag overrides the environment variable named after it")
    for name, info in Settings.model_fields.items():
        group.add_argument(
            flag_of(name),
            dest=_SETTING + name,
            metavar=variable(name),
            default=argparse.SUPPRESS,
            help=f"{info.description} (${variable(name)})",
        )


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {name.removeprefix(_SETTING): value for name, value in vars(args).items() if name.startswith(_SETTING)}
    return load_settings(**overrides)


def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.service import run

    run(settings)
    return 0


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.readmodel.migrate import migrate

    applied = migrate(settings.database_url, settings.schema_name)
    where = f"schema {settings.schema_name} at {mask_url(settings.database_url)}"
    print(f"applied {', '.join(applied)} to {where}" if applied else f"{where} is up to date")
    return 0


def _cmd_refresh_cache(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.ops.producers import refresh_cache

    print(refresh_cache(settings, args.org))
    return 0


def _cmd_emit(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.ops.producers import emit

    print(emit(settings, args.kind, args.mention_id, args.org, args.mention_date, args.transaction_timestamp))
    return 0


def _cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.ops.backfill import main as backfill_main

    return backfill_main(settings, args)


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.ops.audit import main as audit_main

    return audit_main(settings, args)


def _cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.ops import dead_letters as dlq

    return dlq.main(settings, args)


def _id(what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            return parse_id(value, what)
        except InvalidId as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_org_id = _id("organization id")
_mention_id = _id("mention id")


def _positive_int(value: str) -> int:
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mention-indexer",
        description="Apply mention change events to a Postgres read model and invalidate per-organization Redis caches.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[Settings, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _add_setting_flags(sub)
        sub.set_defaults(handler=handler)
        return sub

    command("run", _cmd_run, "the sidecar: migrate, consume, apply, invalidate, ack; health and metrics over HTTP")
    command("migrate", _cmd_migrate, "create or upgrade the read model")

    backfill = command("backfill", _cmd_backfill, "load the read model from the mentions table")
    backfill.add_argument(
        "--source-query",
        metavar="SQL",
        help="query returning mention_id, organization_id, mention_date [, transaction_timestamp, deleted]",
    )
    backfill.add_argument(
        "--org", type=_org_id, action="append", default=[], metavar="ID", help="limit to this organization (repeatable)"
    )
    backfill.add_argument(
        "--batch-size", type=_positive_int, default=10_000, metavar="N", help="rows per chunk (default 10000)"
    )
    backfill.add_argument(
        "--prune", action="store_true", help="tombstone read-model rows the source no longer has, within the scope"
    )
    backfill.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last committed chunk"
    )
    backfill.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")

    audit = command(
        "audit",
        _cmd_audit,
        "compare the read model with the source and the caches with the read model; --repair what differs"
        " (exit 3 when something differs)",
    )
    audit.add_argument(
        "--source-query",
        metavar="SQL",
        help="query returning mention_id, organization_id, mention_date [, transaction_timestamp, deleted]"
        " (default: $INDEXER_AUDIT_SOURCE_QUERY, else public.mentions)",
    )
    audit.add_argument(
        "--org", type=_org_id, action="append", default=[], metavar="ID", help="limit to this organization (repeatable)"
    )
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    audit.add_argument(
        "--repair",
        action="store_true",
        help="bring every difference back through the version guard, drop stale cache entries, invalidate, audit again",
    )
    audit.add_argument("--dry-run", action="store_true", help="with --repair: say what it would do, change nothing")

    refresh = command(
        "refresh-cache", _cmd_refresh_cache, "publish a TriggerCacheRefresh (all organizations without --org)"
    )
    refresh.add_argument("--org", type=_org_id, metavar="ID", help="the organization to flush")

    emit = command("emit", _cmd_emit, "publish one mention change")
    emit.add_argument("kind", choices=["inserted", "updated", "deleted"])
    emit.add_argument("--mention-id", type=_mention_id, required=True, metavar="N")
    emit.add_argument("--org", type=_org_id, required=True, metavar="ID")
    emit.add_argument("--mention-date", metavar="T", help="RFC1123, RFC1123Z or RFC3339")
    emit.add_argument("--transaction-timestamp", metavar="T", help="RFC1123, RFC1123Z or RFC3339 (default: now)")

    dlq = command("dlq", _cmd_dlq, "inspect dead letters; republish them after a fix")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="count and describe the dead letters (leaves them in place)")
    dlq_list.add_argument("--limit", type=_positive_int, default=100, metavar="N")
    dlq_replay = dlq_commands.add_parser(
        "replay", help="republish dead letters to the exchange with their original routing key"
    )
    dlq_replay.add_argument("--limit", type=_positive_int, metavar="N")
    dlq_purge = dlq_commands.add_parser("purge", help="delete every dead letter")
    dlq_purge.add_argument("--yes", action="store_true", help="confirm")
    for action in (dlq_list, dlq_replay, dlq_purge):  # `dlq list --queue q` as well as `dlq --queue q list`
        _add_setting_flags(action)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        parser.exit(2, f"mention-indexer: configuration error: {exc}\n")
    configure_logging(settings.log_format, settings.log_level)
    handler: Callable[[Settings, argparse.Namespace], int] = args.handler
    tracing.configure()
    try:
        return handler(settings, args)
    except ConfigError as exc:
        print(f"mention-indexer {args.command}: {exc}", file=sys.stderr)
        return 2
    except IndexerError as exc:
        print(f"mention-indexer {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a runtime failure nobody anticipated: one line, exit 1, no traceback
        log.debug("unexpected failure", exc_info=True)
        detail = scrub(str(exc), settings.database_url, settings.source_url, settings.redis_url, settings.amqp_url)
        print(
            f"mention-indexer {args.command}: unexpected {type(exc).__name__}: {detail}"
            " (INDEXER_LOG_LEVEL=DEBUG shows the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        tracing.shutdown()
