"""Client configuration helpers: dotted librdkafka keys, properties files, redaction."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resilient_kafka.errors import ConfigurationError

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
"""Environment variable naming an external cluster; everything falls back to it."""

PROPERTIES_ENV = "KAFKA_CLIENT_PROPERTIES"
"""Environment variable naming a ``key=value`` file of extra client settings (TLS, SASL, ...)."""

_SECRET_MARKERS = ("password", "secret", "key.pem", "ssl.key", "token", "credentials", "jaas")

REDACTED = "[redacted]"


def merge(
    base: Mapping[str, Any], overrides: Mapping[str, Any] | None, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``base`` updated by ``overrides`` (dotted keys), then ``kwargs`` (``group_id=``)."""
    conf = dict(base)
    if overrides:
        conf.update(overrides)
    conf.update({key.replace("_", "."): value for key, value in kwargs.items()})
    return conf


def number(value: Any) -> float:
    """A numeric config value as librdkafka reads it (``"10"`` or ``10``); NaN when it is not
    a number (librdkafka then refuses the property with its own error)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def is_secret(key: str) -> bool:
    """Whether a librdkafka setting holds a secret that must never be logged or exported."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``conf`` safe to log: secret values replaced, callables shown by name."""
    return {key: REDACTED if is_secret(key) else value for key, value in conf.items()}


def parse_properties(text: str, source: str = "<string>") -> dict[str, str]:
    """Parse Java-style client properties (``key=value`` or ``key: value``, ``#`` comments).

    The same format Kafka's CLI tools and kcat's ``-F`` read, so a team's existing
    ``client.properties`` works unchanged.
    """
    conf: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        positions = [p for p in (line.find("="), line.find(":")) if p >= 0]
        if not positions:
            raise ConfigurationError(f"{source}:{number}: expected 'key=value', got {line!r}")
        split = min(positions)
        key, value = line[:split].strip(), line[split + 1 :].strip()
        if not key:
            raise ConfigurationError(f"{source}:{number}: empty key in {line!r}")
        conf[key] = value
    return conf


def load_properties(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a properties file; a missing or unreadable file is a :class:`ConfigurationError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read client properties file {path}: {exc}") from exc
    return parse_properties(text, source=str(path))


def extra_config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Client settings from the file named by ``KAFKA_CLIENT_PROPERTIES`` (empty if unset)."""
    env = os.environ if environ is None else environ
    path = env.get(PROPERTIES_ENV, "").strip()
    extra = load_properties(path) if path else {}
    extra.pop("bootstrap.servers", None)
    return extra


def external_cluster_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, str]] | None:
    """``(bootstrap_servers, extra_config)`` when ``KAFKA_BOOTSTRAP_SERVERS`` is set, else None."""
    env = os.environ if environ is None else environ
    bootstrap = env.get(BOOTSTRAP_ENV, "").strip()
    if not bootstrap:
        return None
    return bootstrap, extra_config_from_env(env)
