"""Configuration: one frozen object, read from the environment (and command-line flags) in one place.

Nothing else in the service reads ``os.environ``. :func:`load` validates every
value at start and raises :class:`~service.errors.ConfigError` listing all
problems at once, so an operator fixes them in one go.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from service.errors import ConfigError

DEFAULT_PARTNER_ADDR = "[::]:50051"
DEFAULT_INTERNAL_ADDR = "127.0.0.1:50052"
MIN_INTERNAL_TOKEN_LENGTH = 32


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificate files for the partner listener; a client CA turns on mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Transport and request limits applied to every listener (see the README for each default)."""

    max_receive_message_bytes: int = 64 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_concurrent_rpcs: int = 1000
    max_concurrent_streams: int = 100
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    min_ping_interval_ms: int = 10_000
    max_connection_idle_ms: int = 15 * 60_000
    max_connection_age_ms: int = 60 * 60_000
    max_connection_age_grace_ms: int = 30_000
    default_deadline: float = 10.0

    def options(self, *, reuse_port: bool) -> list[tuple[str, int]]:
        """Return the grpc channel arguments for a server."""
        return [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # Keepalive: probe idle peers, and refuse ping floods (a client may ping at
            # most every min_ping_interval, never without a call; two strikes close it).
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", self.max_connection_idle_ms),
            ("grpc.max_connection_age_ms", self.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_ms),
            # A stale server on the same port would silently take part of the
            # traffic: bind exclusively unless several workers share the port.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service is configured with. Build it with :func:`load`."""

    env: str = "development"
    database_url: str | None = None
    partner_database_url: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".apptgate")
    partner_addr: str = DEFAULT_PARTNER_ADDR
    internal_addr: str = DEFAULT_INTERNAL_ADDR
    internal_token: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None
    allow_insecure: bool = False
    server_secret: str | None = field(default=None, repr=False)
    server_secret_file: Path | None = None
    signing_key: str | None = field(default=None, repr=False)
    signing_key_file: Path | None = None
    data_key: str | None = field(default=None, repr=False)
    data_key_file: Path | None = None
    consent_max_ttl: timedelta = timedelta(days=365)
    partner_rps: float = 50.0
    partner_burst: int = 100
    contact_daily_cap: int = 1000
    patient_daily_cap: int = 5000
    anomaly_factor: float = 10.0
    anomaly_min_volume: int = 5000
    anomaly_suspend: bool = False
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_connect_timeout: float = 5.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)
    workers: int = field(default_factory=lambda: _cpus())
    #: The event loop of ``serve`` and ``demo``: "uvloop" (libuv; faster sockets for
    #: both gRPC's and asyncpg's I/O) or "asyncio" (the standard library's).
    event_loop: str = "uvloop"
    reuse_port: bool = False
    feed_buffer: int = 1000
    feed_max_streams: int = 20
    feed_retention: timedelta = timedelta(days=7)
    #: Basic views each process remembers (``service.views.BasicPages``): ~20 MiB when full; 0 for none.
    view_memo: int = 16_384
    otel_traces_exporter: str = "none"
    otel_metrics_exporter: str = "none"
    otel_traces_protocol: str = "http/protobuf"
    otel_metrics_protocol: str = "http/protobuf"
    otel_sdk_disabled: bool = False

    @property
    def production(self) -> bool:
        """True when ``APPTGATE_ENV=production``: no development keys, no embedded database."""
        return self.env == "production"


#: Environment variable → (settings field, parser). Flags use the same field names.
_ENVIRONMENT: dict[str, str] = {
    "APPTGATE_ENV": "env",
    "DATABASE_URL": "database_url",
    "APPTGATE_PARTNER_DATABASE_URL": "partner_database_url",
    "APPTGATE_DATA_DIR": "data_dir",
    "APPTGATE_PARTNER_ADDR": "partner_addr",
    "APPTGATE_INTERNAL_ADDR": "internal_addr",
    "APPTGATE_INTERNAL_TOKEN": "internal_token",
    "APPTGATE_TLS_CERT": "tls_cert",
    "APPTGATE_TLS_KEY": "tls_key",
    "APPTGATE_TLS_CLIENT_CA": "tls_client_ca",
    "APPTGATE_ALLOW_INSECURE": "allow_insecure",
    "APPTGATE_SERVER_SECRET": "server_secret",
    "APPTGATE_SERVER_SECRET_FILE": "server_secret_file",
    "APPTGATE_SIGNING_KEY": "signing_key",
    "APPTGATE_SIGNING_KEY_FILE": "signing_key_file",
    "APPTGATE_DATA_KEY": "data_key",
    "APPTGATE_DATA_KEY_FILE": "data_key_file",
    "APPTGATE_CONSENT_MAX_TTL": "consent_max_ttl",
    "APPTGATE_PARTNER_RPS": "partner_rps",
    "APPTGATE_PARTNER_BURST": "partner_burst",
    "APPTGATE_CONTACT_DAILY_CAP": "contact_daily_cap",
    "APPTGATE_PATIENT_DAILY_CAP": "patient_daily_cap",
    "APPTGATE_ANOMALY_FACTOR": "anomaly_factor",
    "APPTGATE_ANOMALY_MIN_VOLUME": "anomaly_min_volume",
    "APPTGATE_ANOMALY_SUSPEND": "anomaly_suspend",
    "APPTGATE_DB_POOL_MIN": "db_pool_min",
    "APPTGATE_DB_POOL_MAX": "db_pool_max",
    "APPTGATE_DB_CONNECT_TIMEOUT": "db_connect_timeout",
    "APPTGATE_SHUTDOWN_GRACE": "shutdown_grace",
    "APPTGATE_LOG_LEVEL": "log_level",
    "APPTGATE_WORKERS": "workers",
    "APPTGATE_EVENT_LOOP": "event_loop",
    "APPTGATE_REUSE_PORT": "reuse_port",
    "APPTGATE_MAX_MESSAGE_BYTES": "limits.max_receive_message_bytes",
    "APPTGATE_MAX_METADATA_BYTES": "limits.max_metadata_bytes",
    "APPTGATE_MAX_CONCURRENT_RPCS": "limits.max_concurrent_rpcs",
    "APPTGATE_MAX_STREAMS_PER_CONNECTION": "limits.max_concurrent_streams",
    "APPTGATE_KEEPALIVE_TIME_MS": "limits.keepalive_time_ms",
    "APPTGATE_KEEPALIVE_TIMEOUT_MS": "limits.keepalive_timeout_ms",
    "APPTGATE_MIN_PING_INTERVAL_MS": "limits.min_ping_interval_ms",
    "APPTGATE_MAX_CONNECTION_IDLE_MS": "limits.max_connection_idle_ms",
    "APPTGATE_MAX_CONNECTION_AGE_MS": "limits.max_connection_age_ms",
    "APPTGATE_DEFAULT_DEADLINE": "limits.default_deadline",
    "APPTGATE_FEED_BUFFER": "feed_buffer",
    "APPTGATE_FEED_MAX_STREAMS": "feed_max_streams",
    "APPTGATE_FEED_RETENTION": "feed_retention",
    "APPTGATE_VIEW_MEMO": "view_memo",
    # OpenTelemetry's standard variables that decide which exporters exist; the
    # SDK reads the others (endpoint, headers, sampler, resource) itself.
    "OTEL_TRACES_EXPORTER": "otel_traces_exporter",
    "OTEL_METRICS_EXPORTER": "otel_metrics_exporter",
    "OTEL_SDK_DISABLED": "otel_sdk_disabled",
}
_OTLP_PROTOCOL = {
    "otel_traces_protocol": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "otel_metrics_protocol": ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
}

EVENT_LOOPS = ("uvloop", "asyncio")

#: The variables the service understands, for documentation and ``--help``.
ENVIRONMENT_VARIABLES = tuple(_ENVIRONMENT)


def load(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build validated settings from an environment mapping and flag overrides.

    ``overrides`` maps the names in ``_ENVIRONMENT``'s values to values given
    on the command line; ``None`` values are ignored. Raises ``ConfigError``.
    """
    raw: dict[str, Any] = {name: environ[var] for var, name in _ENVIRONMENT.items() if environ.get(var)}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    problems: list[str] = []
    parsed: dict[str, Any] = {}

    def take(name: str, convert: Any, var: str) -> None:
        if name not in raw:
            return
        try:
            parsed[name] = convert(raw[name])
        except (TypeError, ValueError) as exc:
            problems.append(f"{var}: {exc}")

    for var, name in _ENVIRONMENT.items():
        if name in {"tls_cert", "tls_key", "tls_client_ca"}:
            continue
        converter = _CONVERTERS.get(name, str)
        take(name, converter, var)

    for name, variables in _OTLP_PROTOCOL.items():
        chosen = next((environ[v] for v in variables if environ.get(v)), None)
        if chosen is not None:
            parsed[name] = chosen.strip().lower()

    tls_values = {k: raw.get(k) for k in ("tls_cert", "tls_key", "tls_client_ca")}
    if tls_values["tls_cert"] or tls_values["tls_key"]:
        if not (tls_values["tls_cert"] and tls_values["tls_key"]):
            problems.append("APPTGATE_TLS_CERT and APPTGATE_TLS_KEY must be set together")
        else:
            tls = TlsFiles(
                Path(tls_values["tls_cert"]),
                Path(tls_values["tls_key"]),
                Path(tls_values["tls_client_ca"]) if tls_values["tls_client_ca"] else None,
            )
            for label, path in (("APPTGATE_TLS_CERT", tls.cert_file), ("APPTGATE_TLS_KEY", tls.key_file)):
                if not path.is_file():
                    problems.append(f"{label}: no such file: {path}")
            if tls.client_ca_file is not None and not tls.client_ca_file.is_file():
                problems.append(f"APPTGATE_TLS_CLIENT_CA: no such file: {tls.client_ca_file}")
            parsed["tls"] = tls
    elif tls_values["tls_client_ca"]:
        problems.append("APPTGATE_TLS_CLIENT_CA needs APPTGATE_TLS_CERT and APPTGATE_TLS_KEY")

    limit_values = {k.split(".", 1)[1]: parsed.pop(k) for k in list(parsed) if k.startswith("limits.")}
    if limit_values:
        parsed["limits"] = Limits(**limit_values)
    settings = Settings(**parsed) if not problems else Settings()
    problems.extend(_check(settings) if not problems else [])
    if problems:
        raise ConfigError(problems)
    return settings


def _check(s: Settings) -> list[str]:
    problems: list[str] = []
    if s.env not in {"development", "production"}:
        problems.append("APPTGATE_ENV: must be 'development' or 'production'")
    for var, addr in (("APPTGATE_PARTNER_ADDR", s.partner_addr), ("APPTGATE_INTERNAL_ADDR", s.internal_addr)):
        try:
            split_address(addr)
        except ValueError as exc:
            problems.append(f"{var}: {exc}")
    if s.internal_token is not None and len(s.internal_token) < MIN_INTERNAL_TOKEN_LENGTH:
        problems.append(f"APPTGATE_INTERNAL_TOKEN: must be at least {MIN_INTERNAL_TOKEN_LENGTH} characters")
    if not 1 <= s.db_pool_min <= s.db_pool_max:
        problems.append("APPTGATE_DB_POOL_MIN/MAX: need 1 <= min <= max")
    sizes = [getattr(s.limits, name) for name in _LIMIT_COUNTS]
    if min(sizes) < 1 or s.limits.default_deadline <= 0:
        problems.append("APPTGATE_MAX_*/KEEPALIVE_*/DEFAULT_DEADLINE: must be positive")
    if s.event_loop not in EVENT_LOOPS:
        problems.append(f"APPTGATE_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, not {s.event_loop!r}")
    if not 1 <= s.workers <= 256:
        problems.append("APPTGATE_WORKERS: from 1 to 256")
    if s.feed_buffer < 1 or s.feed_max_streams < 1 or s.feed_retention < timedelta(minutes=1):
        problems.append("APPTGATE_FEED_BUFFER/_MAX_STREAMS must be positive, APPTGATE_FEED_RETENTION at least 60")
    if s.view_memo < 0:
        problems.append("APPTGATE_VIEW_MEMO: 0 or more")
    if s.partner_rps <= 0 or s.partner_burst < 1 or s.contact_daily_cap < 0 or s.patient_daily_cap < 0:
        problems.append("APPTGATE_PARTNER_RPS/_BURST and the daily caps must be positive")
    if s.anomaly_factor <= 1 or s.anomaly_min_volume < 1:
        problems.append("APPTGATE_ANOMALY_FACTOR must be above 1 and APPTGATE_ANOMALY_MIN_VOLUME positive")
    if s.consent_max_ttl < timedelta(seconds=1):
        problems.append("APPTGATE_CONSENT_MAX_TTL: must be at least 1 second")
    if s.shutdown_grace < 0 or s.db_connect_timeout <= 0:
        problems.append("APPTGATE_SHUTDOWN_GRACE/APPTGATE_DB_CONNECT_TIMEOUT: must be positive")
    for var, value in (
        ("OTEL_TRACES_EXPORTER", s.otel_traces_exporter),
        ("OTEL_METRICS_EXPORTER", s.otel_metrics_exporter),
    ):
        if value not in {"none", "console", "otlp"}:
            problems.append(f"{var}: one of otlp, console, none (got {value!r})")
    for protocol in (s.otel_traces_protocol, s.otel_metrics_protocol):
        if protocol not in {"grpc", "http/protobuf"}:
            problems.append(f"OTEL_EXPORTER_OTLP_PROTOCOL: grpc or http/protobuf (got {protocol!r})")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        problems.append("APPTGATE_LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR")
    return problems


def split_address(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 hosts in brackets) and check both parts. Raises ``ValueError``."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {addr!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def is_loopback(addr: str) -> bool:
    """True when ``addr`` binds only a loopback interface (so plaintext stays on this machine)."""
    host, _ = split_address(addr)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_LIMIT_COUNTS = (
    "max_receive_message_bytes",
    "max_metadata_bytes",
    "max_concurrent_rpcs",
    "max_concurrent_streams",
    "keepalive_time_ms",
    "keepalive_timeout_ms",
    "min_ping_interval_ms",
    "max_connection_idle_ms",
    "max_connection_age_ms",
)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _seconds(value: Any) -> timedelta:
    seconds = float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("expected a number of seconds")
    return timedelta(seconds=seconds)


def _optional_path(value: Any) -> Path:
    return Path(str(value))


_CONVERTERS: dict[str, Any] = {
    "env": lambda v: str(v).strip().lower(),
    "data_dir": _optional_path,
    "server_secret_file": _optional_path,
    "signing_key_file": _optional_path,
    "data_key_file": _optional_path,
    "partner_rps": float,
    "partner_burst": int,
    "contact_daily_cap": int,
    "patient_daily_cap": int,
    "anomaly_factor": float,
    "anomaly_min_volume": int,
    "anomaly_suspend": _boolean,
    "allow_insecure": _boolean,
    "consent_max_ttl": _seconds,
    "db_pool_min": int,
    "db_pool_max": int,
    "db_connect_timeout": float,
    "shutdown_grace": float,
    "log_level": lambda v: str(v).upper(),
    "otel_traces_exporter": lambda v: str(v).strip().lower(),
    "otel_metrics_exporter": lambda v: str(v).strip().lower(),
    "otel_sdk_disabled": _boolean,
    "feed_buffer": int,
    "workers": int,
    "event_loop": lambda v: str(v).strip().lower(),
    "reuse_port": _boolean,
    "feed_max_streams": int,
    "feed_retention": _seconds,
    "view_memo": int,
    "limits.default_deadline": float,
    **{f"limits.{name}": int for name in _LIMIT_COUNTS},
}
