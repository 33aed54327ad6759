"""Settings: environment variables, overridden by command-line flags of the same name.

Loaded and validated in one place; every failure becomes a ``ConfigError`` naming the variable, and
URL values are never echoed back (they may carry a password).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from indexer.errors import ConfigError

T = TypeVar("T", str, str | None)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Characters that would turn a key prefix into a glob or break the {org} hash tag.
_PREFIX_FORBIDDEN = set("{}*?[]\\ \t\r\n")


def _parseable(url: T) -> T:
    """A URL whose host or port cannot be parsed fails here (exit 2), not as a crash later."""
    if url is not None:
        try:
            urlsplit(url).port  # noqa: B018 - raises ValueError for a bad port or host
        except ValueError:
            raise ValueError("not a valid URL (check the host and port)") from None
    return url


def _setting(default: Any, variable: str | AliasChoices, description: str, **constraints: Any) -> Any:
    """A field read from ``variable``; ``description`` is also its ``--flag``'s help."""
    return Field(default, validation_alias=variable, description=description, **constraints)


# Settings that may carry a password: each may also be read from the file named by <VARIABLE>_FILE,
# the way Kubernetes and Docker mount secrets.
SECRET_FIELDS = ("database_url", "source_database_url", "redis_url", "amqp_url")


class _SecretFiles(PydanticBaseSettingsSource):
    """``DATABASE_URL_FILE=/run/secrets/db`` gives DATABASE_URL the file's content (surrounding
    white space, such as the newline an editor adds, left out)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is read in __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_FIELDS:
            plain = variable(name)
            path = os.environ.get(f"{plain}_FILE")
            if path is None:
                continue
            if plain in os.environ:
                raise ConfigError(f"{plain} and {plain}_FILE are both set: set one of them")
            try:
                values[name] = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{plain}_FILE: cannot read {path!r}: {exc.__class__.__name__}") from None
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=True,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    database_url: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/postgres", "DATABASE_URL", "Postgres holding the read model"
    )
    source_database_url: str | None = _setting(
        None, "SOURCE_DATABASE_URL", "the mentions database the backfill and the audit read (default: DATABASE_URL)"
    )
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "REDIS_URL", "Redis holding the per-organization caches")
    amqp_url: str = _setting(
        "amqp://guest:guest@127.0.0.1:5672/", "AMQP_URL", "RabbitMQ; the nodes of one cluster separated by commas"
    )
    schema_name: str = _setting("mention_index", "INDEXER_SCHEMA", "Postgres schema of the read model tables")
    exchange: str = _setting("events", "INDEXER_EXCHANGE", "topic exchange, durable")
    queue: str = _setting(
        "mention-indexer", "INDEXER_QUEUE", "the indexer's durable queue; dead letters go to <queue>.dlq"
    )
    cache_prefix: str = _setting(
        "mentions", "INDEXER_CACHE_PREFIX", "Redis key prefix of the caches: <prefix>:{<organization>}:..."
    )
    http_port: int = _setting(
        9180, "INDEXER_HTTP_PORT", "port of /healthz, /readyz and /metrics; 0 turns them off", ge=0, le=65535
    )
    # Tuning knobs (README "Configuration").
    queue_type: Literal["quorum", "classic"] = _setting(
        "quorum", "INDEXER_QUEUE_TYPE", "type of the queues the indexer declares"
    )
    bindings: str = _setting(
        "events.MentionInserted,events.MentionUpdated,events.MentionDeleted,events.TriggerCacheRefresh",
        "INDEXER_BINDINGS",
        "routing keys bound to the queue, comma-separated",
    )
    # INDEXER_BATCH_SIZE is the name of releases before 0.2; `backfill --batch-size` is another thing.
    batch_messages: int = _setting(
        500,
        AliasChoices("INDEXER_BATCH_MESSAGES", "INDEXER_BATCH_SIZE"),
        "most messages applied in one transaction",
        ge=1,
        le=10_000,
    )
    batch_wait_ms: int = _setting(
        0,
        "INDEXER_BATCH_WAIT_MS",
        "how long a batch waits for more messages after its first; 0: none, it takes what has arrived",
        ge=0,
        le=60_000,
    )
    prefetch: int = _setting(
        1000, "INDEXER_PREFETCH", "unacknowledged deliveries the broker may send ahead (bounds memory)", ge=1, le=65_535
    )
    max_message_bytes: int = _setting(
        1_048_576, "INDEXER_MAX_MESSAGE_BYTES", "larger bodies are dead-lettered unread", ge=1024
    )
    retry_initial_s: float = _setting(
        0.2, "INDEXER_RETRY_INITIAL_S", "first backoff after a failure of Postgres, Redis or RabbitMQ", gt=0, le=60
    )
    retry_max_s: float = _setting(10.0, "INDEXER_RETRY_MAX_S", "longest backoff", gt=0, le=600)
    # Exit within 10 s of SIGTERM; closing connections needs the last half second.
    shutdown_timeout_s: float = _setting(
        8.0, "INDEXER_SHUTDOWN_TIMEOUT_S", "time the batch in hand gets to finish after SIGTERM", gt=0, le=9
    )
    cache_ttl_s: int = _setting(
        3600, "INDEXER_CACHE_TTL_S", "expiry of entries filled through the cache helper; 0 = none", ge=0
    )
    track_direct_keys: Literal["auto", "on", "off"] = _setting(
        "auto",
        "INDEXER_TRACK_DIRECT_KEYS",
        "also invalidate keys written without the cache helper (keyspace notifications)",
    )
    log_format: Literal["auto", "text", "json"] = _setting(
        "auto", "INDEXER_LOG_FORMAT", "log lines as text or JSON; auto: JSON unless stderr is a terminal"
    )
    redis_cluster: Literal["auto", "on", "off"] = _setting(
        "auto",
        "INDEXER_REDIS_CLUSTER",
        "whether REDIS_URL names a node of a Redis Cluster (any node, primary or replica); auto: ask it",
    )
    redis_min_replicas: int = _setting(
        0,
        "INDEXER_REDIS_MIN_REPLICAS",
        "replicas that must have an invalidation (WAIT) before the batch is acknowledged; 0: none",
        ge=0,
        le=16,
    )
    outbox_age_s: float = _setting(
        30.0,
        "INDEXER_OUTBOX_AGE_S",
        "invalidations owed for this long are finished by any indexer (one died between commit and invalidation)",
        gt=0,
        le=3600,
    )
    log_summary_s: int = _setting(
        60,
        "INDEXER_LOG_SUMMARY_S",
        "seconds between the info lines that sum up rate, lag and dead letters; 0: none",
        ge=0,
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _setting(
        "INFO", "INDEXER_LOG_LEVEL", "least severe level logged"
    )
    # The continuous audit inside `run` (docs/audit.md): off unless an interval is set.
    audit_interval_s: int = _setting(
        0,
        "INDEXER_AUDIT_INTERVAL_S",
        "seconds between two samples of the continuous audit inside run (whole seconds); 0 = off",
        ge=0,
        le=86_400,
    )
    audit_source_query: str | None = _setting(
        None,
        "INDEXER_AUDIT_SOURCE_QUERY",
        "the source query the audit compares with (default: the backfill's, public.mentions)",
    )
    audit_sample: int = _setting(
        1000,
        "INDEXER_AUDIT_SAMPLE",
        "mentions, and cache entries, the continuous audit checks per interval (bounds its load)",
        ge=1,
        le=100_000,
    )

    @field_validator("database_url", "source_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return _parseable(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return _parseable(value)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        nodes = [node.strip() for node in value.split(",")]
        if not all(node.startswith(("amqp://", "amqps://")) for node in nodes):
            raise ValueError("must be amqp:// or amqps:// URLs, several separated by commas")
        for node in nodes:
            _parseable(node)
        return ",".join(nodes)

    @field_validator("schema_name")
    @classmethod
    def _schema(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a plain SQL identifier (letters, digits, underscore; at most 63)")
        return value

    @field_validator("exchange", "queue")
    @classmethod
    def _amqp_name(cls, value: str) -> str:
        if not value or len(value.encode()) > 250 or value.startswith("amq."):
            raise ValueError("must be 1 to 250 bytes and not start with 'amq.'")
        return value

    @field_validator("cache_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or _PREFIX_FORBIDDEN & set(value):
            raise ValueError("must be non-empty and contain none of { } * ? [ ] \\ or white space")
        return value

    @field_validator("audit_source_query")
    @classmethod
    def _audit_query(cls, value: str | None) -> str | None:
        if value is not None and not value.strip().rstrip(";").strip():
            raise ValueError("must be a query; unset it for the default source, public.mentions")
        return value

    @field_validator("bindings")
    @classmethod
    def _bindings(cls, value: str) -> str:
        if not [key for key in value.split(",") if key.strip()]:
            raise ValueError("must list at least one routing key, comma-separated")
        return value

    @model_validator(mode="after")
    def _prefetch_covers_batch(self) -> Settings:
        if self.prefetch < self.batch_messages:
            raise ValueError(
                f"INDEXER_PREFETCH ({self.prefetch}) must be at least INDEXER_BATCH_MESSAGES ({self.batch_messages})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags, then variables, then secret files, then the defaults.
        return init_settings, env_settings, _SecretFiles(settings_cls)

    @property
    def source_url(self) -> str:
        return self.source_database_url or self.database_url

    @property
    def routing_keys(self) -> list[str]:
        return [key.strip() for key in self.bindings.split(",") if key.strip()]

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"


_URL_FIELDS = {"DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL"}


def variable(field_name: str) -> str:
    """The environment variable of a settings field (its first name, where it has several)."""
    alias = Settings.model_fields[field_name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias)


def _variable_of(loc: tuple[Any, ...]) -> str:
    name = str(loc[0]) if loc else ""
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if name == field_name or name in names:
            return variable(field_name)
    return name or "configuration"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (field names, None = not given) on top."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            variable = _variable_of(tuple(error.get("loc", ())))
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            if variable not in _URL_FIELDS and "input" in error and not isinstance(error["input"], dict):
                message += f" (got {error['input']!r})"
            lines.append(f"{variable}: {message}")
        raise ConfigError("; ".join(lines)) from None
