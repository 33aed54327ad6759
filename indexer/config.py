"""Settings (SPEC §3): environment variables, overridden by command-line flags of the same meaning.

Loaded and validated in one place; every failure becomes a ``ConfigError`` naming the variable, and
URL values are never echoed back (they may carry a password).
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=True,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    database_url: str = Field("postgresql://postgres@127.0.0.1:5432/postgres", validation_alias="DATABASE_URL")
    source_database_url: str | None = Field(None, validation_alias="SOURCE_DATABASE_URL")
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", validation_alias="AMQP_URL")
    schema_name: str = Field("mention_index", validation_alias="INDEXER_SCHEMA")
    exchange: str = Field("events", validation_alias="INDEXER_EXCHANGE")
    queue: str = Field("mention-indexer", validation_alias="INDEXER_QUEUE")
    cache_prefix: str = Field("mentions", validation_alias="INDEXER_CACHE_PREFIX")
    http_port: int = Field(9180, ge=0, le=65535, validation_alias="INDEXER_HTTP_PORT")

    # Tuning knobs (README "Configuration").
    queue_type: Literal["quorum", "classic"] = Field("quorum", validation_alias="INDEXER_QUEUE_TYPE")
    bindings: str = Field(
        "events.MentionInserted,events.MentionUpdated,events.MentionDeleted,events.TriggerCacheRefresh",
        validation_alias="INDEXER_BINDINGS",
    )
    batch_size: int = Field(500, ge=1, le=10_000, validation_alias="INDEXER_BATCH_SIZE")
    batch_wait_ms: int = Field(50, ge=0, le=60_000, validation_alias="INDEXER_BATCH_WAIT_MS")
    prefetch: int = Field(1000, ge=1, le=65_535, validation_alias="INDEXER_PREFETCH")
    max_message_bytes: int = Field(1_048_576, ge=1024, validation_alias="INDEXER_MAX_MESSAGE_BYTES")
    retry_initial_s: float = Field(0.2, gt=0, le=60, validation_alias="INDEXER_RETRY_INITIAL_S")
    retry_max_s: float = Field(10.0, gt=0, le=600, validation_alias="INDEXER_RETRY_MAX_S")
    # SPEC §9: exit within 10 s of SIGTERM; closing connections needs the last half second.
    shutdown_timeout_s: float = Field(8.0, gt=0, le=9, validation_alias="INDEXER_SHUTDOWN_TIMEOUT_S")
    cache_ttl_s: int = Field(3600, ge=0, validation_alias="INDEXER_CACHE_TTL_S")
    track_direct_keys: Literal["auto", "on", "off"] = Field("auto", validation_alias="INDEXER_TRACK_DIRECT_KEYS")
    log_format: Literal["text", "json"] = Field("text", validation_alias="INDEXER_LOG_FORMAT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias="INDEXER_LOG_LEVEL")

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
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return _parseable(value)

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

    @field_validator("bindings")
    @classmethod
    def _bindings(cls, value: str) -> str:
        if not [key for key in value.split(",") if key.strip()]:
            raise ValueError("must list at least one routing key, comma-separated")
        return value

    @model_validator(mode="after")
    def _prefetch_covers_batch(self) -> Settings:
        if self.prefetch < self.batch_size:
            raise ValueError(
                f"INDEXER_PREFETCH ({self.prefetch}) must be at least INDEXER_BATCH_SIZE ({self.batch_size})"
            )
        return self

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


def _variable_of(loc: tuple[Any, ...]) -> str:
    name = str(loc[0]) if loc else ""
    for field_name, info in Settings.model_fields.items():
        if name in (field_name, info.validation_alias):
            return str(info.validation_alias)
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
