"""Pure helpers: properties files, dotted keys, redaction, the environment contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_kafka import _config
from resilient_kafka._extras import require
from resilient_kafka.errors import ConfigurationError, MissingDependencyError
from resilient_kafka.testing import ExternalKafka
from resilient_kafka.testing._process import strip_ansi, tail


def test_properties_accept_equals_colon_comments_and_blank_lines() -> None:
    text = """
    # a client.properties as Kafka's tools write it
    security.protocol=SASL_SSL
    sasl.mechanism : PLAIN
    ! another comment style
    sasl.jaas.config=org.apache...PlainLoginModule required username="u" password="p=q";
    """
    assert _config.parse_properties(text) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.jaas.config": 'org.apache...PlainLoginModule required username="u" password="p=q";',
    }


def test_malformed_properties_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("acks=all\nthis line has no separator\n")
    with pytest.raises(ConfigurationError, match=r"client.properties:2: expected 'key=value'"):
        _config.load_properties(path)
    with pytest.raises(ConfigurationError, match="empty key"):
        _config.parse_properties("  = value")


def test_missing_properties_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read client properties file"):
        _config.load_properties(tmp_path / "absent.properties")


_keys = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True)
_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
).map(str.strip)


@given(st.dictionaries(_keys, _values, max_size=8))
def test_properties_round_trip(conf: dict[str, str]) -> None:
    text = "\n".join(f"{key}={value}" for key, value in conf.items())
    assert _config.parse_properties(text) == conf


def test_merge_turns_underscores_into_dots_and_overrides_win() -> None:
    base = {"bootstrap.servers": "b:9092", "group.id": "base"}
    merged = _config.merge(base, {"log_level": 7}, {"group_id": "g", "auto_offset_reset": "x"})
    assert merged == {
        "bootstrap.servers": "b:9092",
        "group.id": "g",
        "auto.offset.reset": "x",
        "log_level": 7,  # the dict form keeps librdkafka's few underscore keys intact
    }
    assert base["group.id"] == "base"


def test_redact_hides_every_secret_and_keeps_the_rest() -> None:
    conf = {
        "bootstrap.servers": "b:9092",
        "sasl.username": "alice",
        "sasl.password": "hunter2",
        "ssl.key.password": "k",
        "ssl.key.pem": "-----BEGIN",
        "sasl.oauthbearer.client.secret": "s",
        "sasl.jaas.config": "password=x",
    }
    shown = _config.redact(conf)
    assert shown["bootstrap.servers"] == "b:9092"
    assert shown["sasl.username"] == "alice"
    secret_keys = set(conf) - {"bootstrap.servers", "sasl.username"}
    assert {shown[k] for k in secret_keys} == {_config.REDACTED}


def test_external_cluster_from_env(tmp_path: Path) -> None:
    assert _config.external_cluster_from_env({}) is None
    assert _config.external_cluster_from_env({"KAFKA_BOOTSTRAP_SERVERS": "  "}) is None
    props = tmp_path / "client.properties"
    props.write_text("bootstrap.servers=ignored:1\nsecurity.protocol=SSL\nsasl.password=pw\n")
    found = _config.external_cluster_from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "KAFKA_CLIENT_PROPERTIES": str(props)}
    )
    assert found == ("k1:9092,k2:9092", {"security.protocol": "SSL", "sasl.password": "pw"})

    cluster = ExternalKafka(*found)
    assert cluster.client_config()["security.protocol"] == "SSL"
    assert cluster.client_config()["session.timeout.ms"] == 6000
    assert "session.timeout.ms" not in cluster.producer_config()
    assert "pw" not in repr(cluster)


def test_require_names_the_extra_to_install() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require("surely_not_installed_module.sub", extra="chaos", purpose="the chaos runner")
    assert str(info.value) == (
        "the chaos runner needs the Python package 'surely_not_installed_module', which is not "
        "installed. Install it with: pip install 'resilient-kafka[chaos]'"
    )
    assert require("json", extra="x", purpose="y").dumps([]) == "[]"


def test_log_tail_strips_colour_codes() -> None:
    coloured = "\x1b[2mline one\x1b[0m\n\x1b[31mERROR\x1b[0m boom\n"
    assert strip_ansi(coloured) == "line one\nERROR boom\n"
    assert tail(coloured, lines=1) == "ERROR boom"
