from __future__ import annotations

import pytest

from indexer.errors import Unavailable
from indexer.redact import mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("postgresql://u@h:5432/db?password=s3cret&sslmode=require", "postgresql://u@h:5432/db?password=***&sslmode=require"),
        ("postgresql://h/db?sslpassword=s3cret", "postgresql://h/db?sslpassword=***"),
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
    ],
)
def test_passwords_are_masked_wherever_the_url_carries_them(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in str(Unavailable("postgres", url, "down"))
