"""Configuration: defaults < YAML file < JOULEGATE_* environment < overrides, and bad values."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.config import DEFAULT_ROUTES, FIELDS, Config, ConfigError, Route, load_config
from proxy.tasks import TASKS

DIGEST_A = hashlib.sha256(b"sk-tenant-a").hexdigest()
DIGEST_B = hashlib.sha256(b"sk-tenant-b").hexdigest()


def write(tmp_path: Path, text: str | bytes, name: str = "joulegate.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stray JOULEGATE_* variables from the shell that runs the tests."""
    for name in list(os.environ):
        if name.startswith("JOULEGATE_"):
            monkeypatch.delenv(name)


# ---- defaults ----


def test_defaults_without_file_or_environment() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.upstream == "http://127.0.0.1:8000"
    assert config.listen == "127.0.0.1:8080"
    assert config.listen_host == "127.0.0.1"
    assert config.listen_port == 8080
    assert config.meter == "auto"
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.connect_timeout_seconds == 5.0
    assert config.read_timeout_seconds == 300.0
    assert config.upstream_connections == 1024
    assert config.inject_stream_usage is True
    assert config.routes == DEFAULT_ROUTES
    assert dict(config.api_keys) == {}
    assert config.models == ()
    assert config.max_models == 50
    assert config.log_level == "info"
    assert config.tenants == frozenset({"anonymous"})


def test_default_routes_follow_design() -> None:
    table = {route.path: route.task for route in DEFAULT_ROUTES}
    assert table == {
        "/v1/chat/completions": "text-generation",
        "/v1/completions": "text-generation",
        "/generate": "text-generation",
        "/generate_stream": "text-generation",
        "/v1/images/generations": "image-generation",
        "/v1/embeddings": "embeddings",
        "/v1/audio/transcriptions": "speech-recognition",
        "/v1/audio/speech": "text-to-speech",
        # joulegate-model-server's routes for the study's other tasks
        "/v1/classifications": "text-classification",
        "/v1/summarizations": "summarization",
        "/v1/image-classifications": "image-classification",
    }
    assert all(route.task in TASKS for route in DEFAULT_ROUTES)


def test_every_field_has_a_parser() -> None:
    assert set(FIELDS) == set(Config.__dataclass_fields__)


# ---- YAML file ----


FULL_FILE = f"""
upstream: https://models.internal:9000/
listen: 0.0.0.0:9090
meter: synthetic:200
max_body_bytes: 10mb
connect_timeout_seconds: 2.5
read_timeout_seconds: 60
upstream_connections: 32
inject_stream_usage: false
routes:
  - path: /v1/chat/completions
    task: text-generation
  - path: /models/{{model:path}}
    task: text-classification
api_keys:
  {DIGEST_A}: team-a
  {DIGEST_B.upper()}: team-b
models: [gpt2, sdxl-turbo]
max_models: 10
log_level: DEBUG
"""


def test_file_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), environ={})
    assert config.upstream == "https://models.internal:9000"  # trailing slash dropped
    assert config.listen == "0.0.0.0:9090"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 9090)
    assert config.meter == "synthetic:200"
    assert config.max_body_bytes == 10_000_000
    assert config.connect_timeout_seconds == 2.5
    assert config.read_timeout_seconds == 60.0
    assert isinstance(config.read_timeout_seconds, float)
    assert config.upstream_connections == 32
    assert config.inject_stream_usage is False
    assert config.routes == (
        Route("/v1/chat/completions", "text-generation"),
        Route("/models/{model:path}", "text-classification"),
    )
    # Digests are normalised to lower case, the way key_digest spells them.
    assert dict(config.api_keys) == {DIGEST_A: "team-a", DIGEST_B: "team-b"}
    assert config.tenants == frozenset({"team-a", "team-b", "anonymous"})
    assert config.models == ("gpt2", "sdxl-turbo")
    assert config.max_models == 10
    assert config.log_level == "debug"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}) == Config()
    assert load_config(write(tmp_path, "# only a comment\n"), environ={}) == Config()


def test_null_api_keys_and_models_mean_none(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "api_keys:\nmodels:\n"), environ={})
    assert dict(config.api_keys) == {}
    assert config.models == ()


# ---- environment and overrides ----


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: http://file:1\nlisten: 1.2.3.4:1\nmeter: cpu\nmodels: [a]\n")
    environ = {
        "JOULEGATE_UPSTREAM": "http://env:2",
        "JOULEGATE_METER": "nvml:0,1",
        "JOULEGATE_INJECT_STREAM_USAGE": "off",
        "JOULEGATE_UPSTREAM_CONNECTIONS": " 8 ",
        "JOULEGATE_READ_TIMEOUT_SECONDS": "12.5",
        "JOULEGATE_MAX_BODY_BYTES": "1KiB",
        "PATH": "/usr/bin",  # not ours: ignored
        "JOULEGATE_CONFIG": str(path),  # read by the CLI, not a setting
    }
    config = load_config(path, environ=environ)
    assert config.upstream == "http://env:2"
    assert config.meter == "nvml:0,1"
    assert config.inject_stream_usage is False
    assert config.upstream_connections == 8
    assert config.read_timeout_seconds == 12.5
    assert config.max_body_bytes == 1024
    # Keys the environment does not set keep the file's values.
    assert config.listen == "1.2.3.4:1"
    assert config.models == ("a",)


def test_overrides_beat_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: http://file:1\nlisten: 1.1.1.1:1\nmeter: cpu\n")
    environ = {"JOULEGATE_UPSTREAM": "http://env:2", "JOULEGATE_LISTEN": "2.2.2.2:2"}
    config = load_config(
        path,
        environ=environ,
        overrides={"upstream": "http://flag:3", "listen": None, "meter": None},
    )
    assert config.upstream == "http://flag:3"
    assert config.listen == "2.2.2.2:2"  # a None override (flag not given) changes nothing
    assert config.meter == "cpu"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={"listen": "bad"})
    assert raised.value.key == "listen"


@pytest.mark.usefixtures("clean_environment")
def test_environment_from_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOULEGATE_LOG_LEVEL", "warning")
    assert load_config().log_level == "warning"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        (" on ", True),
        ("0", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
    ],
)
def test_boolean_spellings(text: str, expected: bool) -> None:
    config = load_config(environ={"JOULEGATE_INJECT_STREAM_USAGE": text})
    assert config.inject_stream_usage is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32MiB", 32 * 1024**2),
        ("10mb", 10 * 1000**2),
        ("10MB", 10 * 1000**2),
        ("1 GiB", 1024**3),
        ("2kb", 2000),
        ("3KiB", 3072),
        ("512b", 512),
        ("1048576", 1048576),
    ],
)
def test_sizes_with_units(text: str, expected: int) -> None:
    assert load_config(environ={"JOULEGATE_MAX_BODY_BYTES": text}).max_body_bytes == expected


def test_sizes_in_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "max_body_bytes: 32MiB\n"), environ={}).max_body_bytes == (
        32 * 1024 * 1024
    )
    assert load_config(write(tmp_path, "max_body_bytes: 4096\n"), environ={}).max_body_bytes == 4096


def test_listen_without_host_binds_all_interfaces() -> None:
    assert load_config(environ={"JOULEGATE_LISTEN": ":9000"}).listen == "0.0.0.0:9000"


def test_environment_carries_yaml_lists_and_maps() -> None:
    environ = {
        "JOULEGATE_ROUTES": '[{"path": "/v1/chat/completions", "task": "text-generation"},'
        " {path: '/models/{model}', task: image-classification}]",
        "JOULEGATE_API_KEYS": f"{{{DIGEST_A}: team-a}}",
        "JOULEGATE_MODELS": "[gpt2, 'stabilityai/sdxl-turbo']",
    }
    config = load_config(environ=environ)
    assert config.routes == (
        Route("/v1/chat/completions", "text-generation"),
        Route("/models/{model}", "image-classification"),
    )
    assert dict(config.api_keys) == {DIGEST_A: "team-a"}
    assert config.models == ("gpt2", "stabilityai/sdxl-turbo")


def test_environment_json_map_for_api_keys() -> None:
    environ = {"JOULEGATE_API_KEYS": f'{{"{DIGEST_B}": "team.b"}}'}
    assert dict(load_config(environ=environ).api_keys) == {DIGEST_B: "team.b"}


# ---- bad values: every key, from file, environment and overrides ----

BAD_VALUES: list[tuple[str, Any]] = [
    ("upstream", "ftp://x"),
    ("upstream", "http://"),
    ("upstream", "http://host/?q=1"),
    ("upstream", ""),
    ("listen", "nope"),
    ("listen", "host:99999"),
    ("listen", "host:"),
    ("meter", "gpu"),
    ("meter", ""),
    ("max_body_bytes", "-1"),
    ("max_body_bytes", -1),
    ("max_body_bytes", 0),
    ("max_body_bytes", "12 parsecs"),
    ("max_body_bytes", True),
    ("max_body_bytes", 1.5),
    ("connect_timeout_seconds", 0),
    ("connect_timeout_seconds", "abc"),
    ("connect_timeout_seconds", -1),
    ("connect_timeout_seconds", "inf"),
    ("connect_timeout_seconds", "nan"),
    ("connect_timeout_seconds", True),
    ("read_timeout_seconds", 0),
    ("read_timeout_seconds", "abc"),
    ("client_header_timeout_seconds", 0),
    ("client_header_timeout_seconds", "-1"),
    ("client_body_timeout_seconds", "inf"),
    ("shutdown_timeout_seconds", 0),
    ("client_body_timeout_seconds", True),
    ("max_header_bytes", 0),
    ("max_header_bytes", "8 furlongs"),
    ("max_headers", 0),
    ("max_headers", 1.5),
    ("upstream_connections", 1.5),
    ("upstream_connections", 0),
    ("upstream_connections", "abc"),
    ("upstream_connections", True),
    ("upstream_connections", [1]),
    ("max_models", 0),
    ("max_models", "2.5"),
    ("inject_stream_usage", "maybe"),
    ("routes", [{"path": "/v1/x", "task": "painting"}]),
    ("routes", [{"path": "v1/no-slash", "task": "embeddings"}]),
    ("routes", [{"path": "/v1/{tenant}", "task": "embeddings"}]),
    ("routes", [{"path": "/{model}/{model}", "task": "embeddings"}]),
    ("routes", [{"path": "/v1/x", "task": "embeddings", "extra": 1}]),
    ("routes", [{"route": "/v1/x", "task": "embeddings"}]),
    ("routes", [{"path": "/v1/x"}]),
    ("routes", ["/v1/x"]),
    ("routes", []),
    ("routes", {"path": "/v1/x", "task": "embeddings"}),
    ("api_keys", {"sk-raw-secret-key": "team-a"}),
    ("api_keys", {DIGEST_A[:-1]: "team-a"}),
    ("api_keys", {DIGEST_A: "team a!"}),
    ("api_keys", {DIGEST_A: ""}),
    ("api_keys", ["sk-raw"]),
    ("models", {"gpt2": 1}),
    ("models", [1, 2]),
    ("models", [""]),
    ("log_level", "loud"),
    ("log_level", 3),
    ("admin_token", 12345),
    ("admin_token", "two words"),
    ("metrics_token", ["token"]),
    ("upstream_api_key", "caf\u00e9-key"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_in_overrides_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={key: value})
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}: ")
    assert "\n" not in str(raised.value)


# In a file, `key:` with no value is null; a None override means "flag not given" instead.
NULL_IN_FILE = [(key, None) for key in ("upstream", "listen", "read_timeout_seconds", "routes")]
NULL_IN_FILE += [("inject_stream_usage", None), ("log_level", None), ("max_body_bytes", None)]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES + NULL_IN_FILE)
def test_bad_value_in_file_names_the_key(tmp_path: Path, key: str, value: Any) -> None:
    path = write(tmp_path, yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}: ")


BAD_ENVIRONMENT = [
    ("upstream", "ftp://x"),
    ("listen", "nope"),
    ("meter", "gpu"),
    ("max_body_bytes", "-1"),
    ("max_body_bytes", "12 parsecs"),
    ("connect_timeout_seconds", "0"),
    ("read_timeout_seconds", "abc"),
    ("upstream_connections", "1.5"),
    ("inject_stream_usage", "maybe"),
    ("routes", "[{path: /v1/x, task: painting}]"),
    ("routes", "[{path: v1/x, task: embeddings}]"),
    ("routes", "[{path: /v1/x, task: embeddings, weight: 2}]"),
    ("routes", "/v1/x"),
    ("api_keys", "{sk-raw-secret: team-a}"),
    ("models", "{a: b}"),
    ("devices", "[1, 2]"),
    ("sample_interval_seconds", "2"),
    ("sample_interval_seconds", "0.001"),
    ("idle_watts", "-5"),
    ("cpu_pid", "0"),
    ("max_models", "-3"),
    ("log_level", "loud"),
    ("admin_token", "tok en"),
    ("metrics_token", "tab\tinside"),
    ("upstream_api_key", "sk-\u00fcber"),
]


@pytest.mark.parametrize(("key", "value"), BAD_ENVIRONMENT)
def test_bad_value_in_environment_names_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={f"JOULEGATE_{key.upper()}": value})
    assert raised.value.key == key
    assert key in str(raised.value)


def test_raw_api_key_is_not_echoed_in_the_error() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={"api_keys": {"sk-super-secret-value": "team"}})
    assert "sk-super-secret-value" not in str(raised.value)
    assert "sha256" in str(raised.value)


def test_config_error_is_a_value_error() -> None:
    error = ConfigError("listen", "expected HOST:PORT")
    assert isinstance(error, ValueError)
    assert str(error) == "listen: expected HOST:PORT"
    assert error.key == "listen"


# Bad values that escape as something other than ConfigError (see the report).
ESCAPING_VALUES: list[tuple[str, str, Any]] = [
    # `_structured` lets yaml.YAMLError through: `_parse` only catches ValueError.
    ("env", "routes", "[unclosed"),
    ("env", "api_keys", "{a: b"),
    ("env", "models", "[gpt2"),
    # `_positive_int(float('inf'))` raises OverflowError (YAML `.inf`).
    ("file", "upstream_connections", ".inf"),
    ("file", "max_models", ".inf"),
    # `_positive_float(10**400)` raises OverflowError.
    ("file", "read_timeout_seconds", "1" + "0" * 400),
]


@pytest.mark.parametrize(("source", "key", "text"), ESCAPING_VALUES)
def test_bad_values_never_escape_as_other_exceptions(
    tmp_path: Path, source: str, key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        if source == "env":
            load_config(environ={f"JOULEGATE_{key.upper()}": text})
        else:
            load_config(write(tmp_path, f"{key}: {text}\n"), environ={})
    assert raised.value.key == key


# ---- unknown keys and bad files ----


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "upstream: http://x:1\nupstrem: http://y:2\n"), environ={})
    assert raised.value.key == "upstrem"
    assert "unknown" in str(raised.value)


def test_unknown_environment_variable_is_rejected() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"JOULEGATE_UPSTREAMS": "http://x:1"})
    assert raised.value.key == "JOULEGATE_UPSTREAMS"
    assert "unknown" in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "absent.yaml", environ={})
    assert raised.value.key == "config"
    assert "absent.yaml" in str(raised.value)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever runs the tests (root ignores chmod).
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ={})
    assert raised.value.key == "config"


@pytest.mark.parametrize("text", ["upstream: [\n", "a: b: c\n", "key: 'unterminated\n", "\t- x\n"])
def test_invalid_yaml_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), environ={})
    assert raised.value.key == "config"
    assert "YAML" in str(raised.value)


def test_invalid_yaml_message_is_one_line(tmp_path: Path) -> None:
    """ConfigError promises a message printed as one line; PyYAML's errors span several."""
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "upstream: [\n"), environ={})
    assert "\n" not in str(raised.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, b"meter: \xe9\xff\n"), environ={})
    assert raised.value.key == "config"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_must_hold_a_map(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), environ={})
    assert raised.value.key == "config"
    assert "map" in str(raised.value)


# ---- the command line ----


@pytest.mark.usefixtures("clean_environment")
def test_cli_bad_listen_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--listen", "bad"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert "listen" in lines[0]
    assert "'bad'" in lines[0]


@pytest.mark.usefixtures("clean_environment")
def test_cli_bad_environment_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOULEGATE_METER", "gpu")
    assert cli.main(["serve"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "meter" in lines[0]


@pytest.mark.usefixtures("clean_environment")
def test_cli_invalid_yaml_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "upstream: [\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "config" in lines[0]


def test_comma_separated_names_are_lists() -> None:
    config = load_config(environ={"JOULEGATE_MODELS": "gpt2, llama", "JOULEGATE_DEVICES": "gpu1"})
    assert config.models == ("gpt2", "llama")
    assert config.devices == ("gpu1",)


# ---- secrets: admin_token, metrics_token, upstream_api_key ----

SECRET_KEYS = ("admin_token", "metrics_token", "upstream_api_key")


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_from_file_and_environment(tmp_path: Path, key: str) -> None:
    assert getattr(load_config(environ={}), key) is None
    from_file = load_config(write(tmp_path, f"{key}: ' s3cret-from-file '\n"), environ={})
    assert getattr(from_file, key) == "s3cret-from-file"
    from_env = load_config(
        write(tmp_path, f"{key}: s3cret-from-file\n"),
        environ={f"JOULEGATE_{key.upper()}": "s3cret/from+env="},
    )
    assert getattr(from_env, key) == "s3cret/from+env="


@pytest.mark.parametrize("key", SECRET_KEYS)
@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_secret_means_unset(tmp_path: Path, key: str, empty: str) -> None:
    """`JOULEGATE_ADMIN_TOKEN=` in a compose file or a Kubernetes manifest turns it off."""
    config = load_config(
        write(tmp_path, f"{key}: from-file\n"), environ={f"JOULEGATE_{key.upper()}": empty}
    )
    assert getattr(config, key) is None
    assert getattr(load_config(write(tmp_path, f"{key}:\n"), environ={}), key) is None


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_a_bad_secret_is_named_but_never_echoed(key: str) -> None:
    secret = "sk-almost-right but-with-a-space"
    with pytest.raises(ConfigError) as raised:
        load_config(environ={f"JOULEGATE_{key.upper()}": secret})
    assert raised.value.key == key
    assert "almost-right" not in str(raised.value) and "with-a-space" not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={key: 987654321})
    assert "987654321" not in str(raised.value)


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secrets_are_not_in_the_config_repr(key: str) -> None:
    config = load_config(environ={}, overrides={key: "sk-never-printed-token"})
    assert "sk-never-printed-token" not in repr(config)
    assert "sk-never-printed-token" not in str(config)


@pytest.mark.parametrize("key", ["admin_token", "metrics_token"])
def test_a_token_that_is_also_a_tenant_key_is_refused(key: str) -> None:
    """Otherwise the tenant holding that key would read every tenant's records."""
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={key: "sk-tenant-a", "api_keys": {DIGEST_A: "a"}})
    assert raised.value.key == key
    assert "sk-tenant-a" not in str(raised.value)


@pytest.mark.usefixtures("clean_environment")
def test_cli_bad_secret_exits_2_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOULEGATE_ADMIN_TOKEN", "hunter2 hunter3")
    assert cli.main(["serve"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "admin_token" in captured.err
    assert "hunter" not in captured.err + captured.out


# ---- client limits (tests/test_bad_input.py holds them against a running proxy) ----


def test_client_limits_and_timeouts_default_like_nginx() -> None:
    config = load_config(environ={})
    assert config.client_header_timeout_seconds == 60.0
    assert config.client_body_timeout_seconds == 60.0
    assert config.max_header_bytes == 16 * 1024
    assert config.max_headers == 128


def test_client_limits_and_timeouts_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "max_header_bytes: 32KiB\nclient_body_timeout_seconds: 2.5\n")
    config = load_config(
        path,
        environ={"JOULEGATE_CLIENT_HEADER_TIMEOUT_SECONDS": "0.5", "JOULEGATE_MAX_HEADERS": "64"},
    )
    assert config.max_header_bytes == 32 * 1024
    assert config.client_body_timeout_seconds == 2.5
    assert config.client_header_timeout_seconds == 0.5
    assert config.max_headers == 64
