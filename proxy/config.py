"""joulegate configuration: defaults, then a YAML file, then `JOULEGATE_*` variables, then flags.

Every key is declared once in `FIELDS` with its parser, so the YAML file, the environment and
the command line accept exactly the same values and reject bad ones with the same message.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.budgets import BudgetSpec, parse_budgets, parse_timezone
from proxy.meter.spec import parse_spec
from proxy.sampler import MAX_INTERVAL, MIN_INTERVAL
from proxy.tasks import TASKS

ENV_PREFIX = "JOULEGATE_"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and is printed as one line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True, slots=True)
class Route:
    """One line of the route table: a path pattern and the task it serves.

    The pattern is a literal path, or contains `{model}` (one path segment) or `{model:path}`
    (the rest of the path), from which the model name is taken for TGI and HF-style routes.
    """

    path: str
    task: str


DEFAULT_ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", "text-generation"),
    Route("/v1/completions", "text-generation"),
    Route("/generate", "text-generation"),
    Route("/generate_stream", "text-generation"),
    Route("/v1/images/generations", "image-generation"),
    Route("/v1/embeddings", "embeddings"),
    Route("/v1/audio/transcriptions", "speech-recognition"),
    Route("/v1/audio/speech", "text-to-speech"),
    # joulegate-model-server's routes for the study's other tasks.
    Route("/v1/classifications", "text-classification"),
    Route("/v1/summarizations", "summarization"),
    Route("/v1/image-classifications", "image-classification"),
)


@dataclass(frozen=True, slots=True)
class Config:
    upstream: str = "http://127.0.0.1:8000"
    listen: str = "127.0.0.1:8080"
    meter: str = "auto"
    sample_interval_seconds: float = 0.05
    # The meter's devices that serve this upstream (labels such as gpu0); empty: all of them.
    devices: tuple[str, ...] = ()
    # Fixed idle power per device for dynamic energy; None: learned while nothing is in flight.
    idle_watts: float | None = None
    cpu_watts_per_core: float = 10.0
    weights: str = "equal"
    cpu_pid: int | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    # The longest header field (name and value) and the most header fields a client may send
    # (431 beyond); bearer tokens with many claims pass 8 KiB. The request line keeps
    # aiohttp's 8190-byte limit (414 beyond).
    max_header_bytes: int = 16 * 1024
    max_headers: int = 128
    # As nginx's client_header_timeout: the time a client has to send a whole request head
    # once it started one (its connection is closed beyond).
    client_header_timeout_seconds: float = 60.0
    # As nginx's client_body_timeout: the longest pause between two reads of a request body,
    # not the time for the whole body (408 beyond).
    client_body_timeout_seconds: float = 60.0
    # On SIGTERM: how long requests in flight may take to finish before they are cut. With the
    # final ledger flush, well below Kubernetes' 30 s default grace period, so the orchestrator's
    # SIGKILL does not come first and lose the records of the streams it would cut.
    shutdown_timeout_seconds: float = 20.0
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 300.0
    upstream_connections: int = 1024
    inject_stream_usage: bool = True
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    # sha256 hex digest of an API key -> tenant name. Raw keys never appear in config or logs.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    # tenant -> team, for reports and budgets by team.
    teams: Mapping[str, str] = field(default_factory=dict)
    # A header set by a trusted gateway in front (e.g. X-Tenant) that names the tenant.
    tenant_header: str | None = None
    # Refuse (401) requests whose tenant is not identified by a known key or the header.
    require_api_key: bool = False
    # Bearer tokens for joulegate's own endpoints; None: open (local development). Secrets:
    # kept out of repr, and no message ever echoes them.
    admin_token: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)
    # joulegate's own key for the upstream; None: the client's Authorization passes through.
    upstream_api_key: str | None = field(default=None, repr=False)
    # Facility energy = device energy x PUE; carbon = facility energy x grid intensity.
    pue: float = 1.0
    # gCO2e/kWh: a number, or a CSV file of hourly values (Electricity Maps, WattTime).
    carbon_intensity: float | str | None = None
    carbon_intensity_unit: str = "g_per_kwh"
    # Label values allowed on metrics; anything else is counted as `other`.
    models: tuple[str, ...] = ()
    max_models: int = 50
    log_level: str = "info"
    # ---- energy budgets (proxy/budgets.py) ----
    budgets: tuple[BudgetSpec, ...] = ()
    # IANA zone in which day, week and month windows start at midnight.
    budget_timezone: str = "UTC"
    # The reservation for a task and model not metered yet; None: the study's per-task mean.
    budget_default_estimate_joules: float | None = None
    # JSON file keeping the budgets' used energy across restarts; None: memory only.
    budget_state_path: str | None = None
    # Where every finished record is kept: sqlite (in data_dir), sqlite:PATH,
    # postgresql://... (a ledger shared by a fleet), or off.
    ledger: str = "sqlite"
    data_dir: str = "data"
    # This proxy's name in a shared ledger; None: the host name.
    instance: str | None = None
    ledger_flush_interval_seconds: float = 0.25
    ledger_max_pending: int = 100_000

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0] or "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def tenants(self) -> frozenset[str]:
        """Tenants known from configuration: the label values metrics keep."""
        budgeted = {budget.tenant for budget in self.budgets if budget.tenant != "*"}
        return frozenset(self.api_keys.values()) | set(self.teams) | budgeted | {"anonymous"}


# ---- parsers: each takes the raw value (YAML-typed or a string) and returns the typed value ----


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # YAML reads `1` as a number, env as text
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_SIZE_UNITS |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _byte_size(value: Any) -> int:
    """Bytes as an integer or with a unit (`32MiB`, `10mb`), because nobody counts 33554432."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as 1048576 or 32MiB, got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"expected a positive size, got {value!r}")
    return size


def _finite_float(value: Any, *, zero_allowed: bool) -> float:
    expected = "a number >= 0" if zero_allowed else "a positive number"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected {expected}, got {value!r}") from None
    low_ok = number >= 0 if zero_allowed else number > 0
    if isinstance(value, bool) or not low_ok or number == float("inf"):
        raise ValueError(f"expected {expected}, got {value!r}")
    return number


def _positive_float(value: Any) -> float:
    return _finite_float(value, zero_allowed=False)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a positive integer, got {value!r}")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected a positive integer, got {value!r}") from None
    if number <= 0 or (isinstance(value, float) and number != value):
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _sample_interval(value: Any) -> float:
    interval = _positive_float(value)
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise ValueError(f"expected {MIN_INTERVAL} to {MAX_INTERVAL} seconds, got {value!r}")
    return interval


def _non_negative_float(value: Any) -> float:
    return _finite_float(value, zero_allowed=True)


def _weights(value: Any) -> str:
    from proxy.weights import POLICIES

    name = _str(value)
    if name not in POLICIES:
        raise ValueError(f"expected one of {', '.join(POLICIES)}, got {value!r}")
    return name


def _teams(value: Any) -> dict[str, str]:
    value = _structured(value)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _NAME.fullmatch(k) and _NAME.fullmatch(v)
        for k, v in value.items()
    ):
        raise ValueError("expected a map of tenant names to team names (letters, digits, _.-)")
    return dict(value)


def _header_name(value: Any) -> str | None:
    if value is None:
        return None
    name = _str(value)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
        raise ValueError(f"expected an HTTP header name, got {value!r}")
    return name


def _secret(value: Any) -> str | None:
    """A token or key; empty means unset. No message echoes the value: it would end up in a
    terminal, a log or a CI transcript."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string (quote it in YAML); the value is not shown")
    secret = value.strip()
    if not secret:
        return None
    if not re.fullmatch(r"[!-~]+", secret):
        raise ValueError(
            "expected printable ASCII without spaces (it is sent in an HTTP header);"
            " the value is not shown"
        )
    return secret


def _pue(value: Any) -> float:
    pue = _positive_float(value)
    if pue < 1.0:
        raise ValueError(f"a PUE is at least 1.0, got {value!r}")
    return pue


def _carbon_intensity(value: Any) -> float | str | None:
    if value is None:
        return None
    try:
        return _non_negative_float(value)
    except ValueError:
        pass
    path = _str(str(value))
    if not Path(path).is_file():
        raise ValueError(f"expected gCO2e/kWh as a number, or a CSV file; {path!r} is neither")
    return path


def _intensity_unit(value: Any) -> str:
    unit = _str(value)
    if unit not in ("g_per_kwh", "lbs_per_mwh"):
        raise ValueError(f"expected g_per_kwh or lbs_per_mwh, got {value!r}")
    return unit


def _ledger(value: Any) -> str:
    from proxy.ledger import parse_spec as parse_ledger_spec

    spec = _str(value)
    parse_ledger_spec(spec)  # the ledger's own grammar and message
    return spec


def _optional_name(value: Any) -> str | None:
    if value is None:
        return None
    name = _str(value)
    if not _NAME.fullmatch(name):
        raise ValueError(f"expected 1-64 letters, digits, '_', '.' or '-', got {value!r}")
    return name


def _flush_interval(value: Any) -> float:
    interval = _positive_float(value)
    if interval > 60:
        raise ValueError(f"expected at most 60 seconds, got {value!r}")
    return interval


def _upstream(value: Any) -> str:
    url = _str(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"expected a URL without query or fragment, got {value!r}")
    return url


def _listen(value: Any) -> str:
    text = _str(str(value))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return f"{host or '0.0.0.0'}:{int(port)}"


def _log_level(value: Any) -> str:
    level = _str(value).lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ValueError(f"expected debug, info, warning or error, got {value!r}")
    return level


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _structured(value: Any) -> Any:
    """Environment variables carry lists and maps as YAML (JSON is YAML too)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ValueError(f"not valid YAML: {_yaml_problem(error)}") from None


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ROUTE_PATTERN = re.compile(r"^/[^{}]*(\{model(:path)?\}[^{}]*)?$")


def _routes(value: Any) -> tuple[Route, ...]:
    value = _structured(value)
    if not isinstance(value, list) or not value:
        raise ValueError("expected a list of {path, task} entries")
    routes = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != {"path", "task"}:
            raise ValueError(f"entry {index}: expected exactly the keys path and task")
        path, task = entry["path"], entry["task"]
        if not isinstance(path, str) or not _ROUTE_PATTERN.match(path):
            raise ValueError(
                f"entry {index}: path {path!r} must start with / and may hold one"
                " {model} or {model:path}"
            )
        if task not in TASKS:
            raise ValueError(f"entry {index}: unknown task {task!r} (one of {', '.join(TASKS)})")
        routes.append(Route(path, task))
    return tuple(routes)


def _api_keys(value: Any) -> dict[str, str]:
    value = _structured(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a map of sha256 hex digests to tenant names")
    keys = {}
    for digest, tenant in value.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ValueError(
                "keys must be sha256 hex digests of API keys (64 hex digits), never raw keys"
            )
        if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'")
        keys[digest.lower()] = tenant
    return keys


def _names(value: Any) -> tuple[str, ...]:
    value = _structured(value)
    if value is None:
        return ()
    if isinstance(value, str):  # `gpu0,gpu1` from a flag or variable
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError("expected a list of names")
    return tuple(value)


# ---- energy budgets ----


def _budgets(value: Any) -> tuple[BudgetSpec, ...]:
    return parse_budgets(_structured(value), TASKS)


def _budget_timezone(value: Any) -> str:
    return parse_timezone(value)


def _optional_joules(value: Any) -> float | None:
    return None if value is None else _positive_float(value)


def _state_path(value: Any) -> str | None:
    if value is None:
        return None
    path = Path(_str(str(value)))
    if not path.parent.is_dir():
        raise ValueError(f"the directory of {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; name a file in it")
    return str(path)


def _meter(value: Any) -> str:
    spec = _str(value)
    parse_spec(spec)  # the meter's own parser: one grammar, one message
    return spec


FIELDS: dict[str, Callable[[Any], Any]] = {
    "upstream": _upstream,
    "listen": _listen,
    "meter": _meter,
    "sample_interval_seconds": _sample_interval,
    "devices": _names,
    "idle_watts": _non_negative_float,
    "cpu_watts_per_core": _positive_float,
    "cpu_pid": _positive_int,
    "weights": _weights,
    "max_body_bytes": _byte_size,
    "max_header_bytes": _byte_size,
    "max_headers": _positive_int,
    "client_header_timeout_seconds": _positive_float,
    "client_body_timeout_seconds": _positive_float,
    "shutdown_timeout_seconds": _positive_float,
    "connect_timeout_seconds": _positive_float,
    "read_timeout_seconds": _positive_float,
    "upstream_connections": _positive_int,
    "inject_stream_usage": _bool,
    "routes": _routes,
    "api_keys": _api_keys,
    "teams": _teams,
    "tenant_header": _header_name,
    "require_api_key": _bool,
    "admin_token": _secret,
    "metrics_token": _secret,
    "upstream_api_key": _secret,
    "pue": _pue,
    "carbon_intensity": _carbon_intensity,
    "carbon_intensity_unit": _intensity_unit,
    "models": _names,
    "max_models": _positive_int,
    "log_level": _log_level,
    "budgets": _budgets,
    "budget_timezone": _budget_timezone,
    "budget_default_estimate_joules": _optional_joules,
    "budget_state_path": _state_path,
    "ledger": _ledger,
    "data_dir": _str,
    "instance": _optional_name,
    "ledger_flush_interval_seconds": _flush_interval,
    "ledger_max_pending": _positive_int,
}
assert set(FIELDS) == {f.name for f in dataclasses.fields(Config)}


def _parse(key: str, value: Any) -> Any:
    if key not in FIELDS:
        raise ConfigError(key, f"unknown setting (known: {', '.join(FIELDS)})")
    try:
        return FIELDS[key](value)
    except ValueError as error:
        raise ConfigError(key, str(error)) from None


def _check_tokens_are_not_tenant_keys(config: Config) -> None:
    """A token that is also a tenant's API key would make that tenant an admin (or a reader
    of every tenant's metrics)."""
    from proxy.classify import key_digest

    for key in ("admin_token", "metrics_token"):
        token = getattr(config, key)
        if token is not None and key_digest(token) in config.api_keys:
            raise ConfigError(key, "is also a tenant's API key in api_keys; use a separate token")


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: defaults < YAML file < `JOULEGATE_*` environment < overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            document = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("config", f"{path} is not UTF-8 text") from None
        except yaml.YAMLError as error:
            raise ConfigError(
                "config", f"{path} is not valid YAML: {_yaml_problem(error)}"
            ) from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError("config", f"{path} must hold a map of keys to values")
        for key, value in document.items():
            if key not in FIELDS:
                raise ConfigError(str(key), f"unknown key in {path} (known: {', '.join(FIELDS)})")
            values[key] = _parse(key, value)
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "config":
            continue
        if key not in FIELDS:
            raise ConfigError(name, f"unknown setting (known: {', '.join(FIELDS)})")
        values[key] = _parse(key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _parse(key, value)
    config = Config(**values)
    _check_tokens_are_not_tenant_keys(config)
    if isinstance(config.carbon_intensity, str):
        from proxy.carbon import CarbonConfigError, IntensitySeries

        try:
            IntensitySeries.from_csv(config.carbon_intensity, config.carbon_intensity_unit)
        except CarbonConfigError as error:
            raise ConfigError("carbon_intensity", str(error)) from None
    return config
