"""Configuration: one frozen object, read from the environment (and command-line flags) in one place.

Nothing else in the service reads ``os.environ``. Each operator-facing
variable is declared once, on the field it sets (:func:`variable`): its name,
parser, default, check and one line of documentation. :func:`load` reads them
all and raises :class:`~service.errors.ConfigError` listing every problem at
once; ``docs/configuration.md`` is rendered from the same declarations
(:func:`reference`, ``python tools/configdoc.py``), and a test keeps it current.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import math
import os
import pwd
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

from service.errors import ConfigError
from service.store.database import partner_login_dsn

DEFAULT_PARTNER_ADDR = "[::]:50051"
DEFAULT_INTERNAL_ADDR = "127.0.0.1:50052"
MIN_INTERNAL_TOKEN_LENGTH = 32
#: A token of fewer distinct characters is refused as trivially weak ("aaaa…", "abab…").
MIN_INTERNAL_TOKEN_DISTINCT = 8


class Environment(enum.StrEnum):
    """What the service refuses: ``production`` refuses development keys and the embedded database."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class EventLoop(enum.StrEnum):
    """The event loop of ``serve`` and ``demo``."""

    #: libuv's sockets, for both gRPC's and asyncpg's I/O.
    UVLOOP = "uvloop"
    #: The standard library's.
    ASYNCIO = "asyncio"


class Exporter(enum.StrEnum):
    """Where an OpenTelemetry signal goes (``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``)."""

    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"
    #: Metrics only: served for scraping on ``/metrics`` (``OTEL_EXPORTER_PROMETHEUS_HOST``/``_PORT``).
    PROMETHEUS = "prometheus"


class OtlpProtocol(enum.StrEnum):
    """The OTLP transport (``OTEL_EXPORTER_OTLP_PROTOCOL``)."""

    HTTP = "http/protobuf"
    GRPC = "grpc"


class LogLevel(enum.StrEnum):
    """The least severe log lines written."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


Check = Callable[[Any], str | None]


@dataclass(frozen=True, slots=True)
class Variable:
    """How one field is configured: its variable (the first of ``names`` set wins), parser, check and doc line."""

    names: tuple[str, ...]
    parse: Callable[[str], Any]
    check: Check | None
    doc: str
    #: The default as the reference shows it, when the field's own would mislead (a computed one).
    shown: str | None

    @property
    def name(self) -> str:
        """The variable's own name."""
        return self.names[0]


def variable(
    name: str | tuple[str, ...],
    default: Any,
    doc: str,
    *,
    parse: Callable[[str], Any] = str,
    check: Check | None = None,
    shown: str | None = None,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare a settings field configured by the environment variable ``name`` (see :class:`Variable`).

    A ``secret`` value is left out of the settings' ``repr``.
    """
    names = (name,) if isinstance(name, str) else name
    metadata = {"variable": Variable(names, parse, check, doc, shown)}
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


# Parsers: text → value, raising ValueError with a message fit for an operator.


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _seconds(text: str) -> timedelta:
    return timedelta(seconds=_number(text))


def _urls(text: str) -> tuple[str, ...]:
    urls = tuple(url.strip() for url in text.split(",") if url.strip())
    for url in urls:
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            # Never the URL itself: it may hold a password.
            raise ValueError("expected postgresql:// URLs separated by commas")
    return urls


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _one_of(kind: type[enum.StrEnum], *, upper: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = text.strip().upper() if upper else text.strip().lower()
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"expected one of {', '.join(kind)}, got {text.strip()!r}") from None

    return parse


def _at_least(minimum: float, what: str = "") -> Check:
    def check(value: Any) -> str | None:
        amount = value.total_seconds() if isinstance(value, timedelta) else value
        return None if amount >= minimum else f"must be at least {minimum:g}{what}"

    return check


def _above(minimum: float) -> Check:
    return lambda value: None if value > minimum else f"must be above {minimum:g}"


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"expected a port from 1 to 65535, got {value}"


def _address(value: str) -> str | None:
    try:
        split_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _token(value: str) -> str | None:
    # The token travels in a header (`authorization: Bearer …`): printable ASCII only. Length
    # alone lets "a" * 32 through, so a token must also mix several characters.
    if len(value) < MIN_INTERNAL_TOKEN_LENGTH:
        return f"must be at least {MIN_INTERNAL_TOKEN_LENGTH} characters"
    if any(character.isspace() for character in value):
        return "must not contain white space"
    if not (value.isascii() and value.isprintable()):
        return "must be printable ASCII (it is sent in a header)"
    if len(set(value)) < MIN_INTERNAL_TOKEN_DISTINCT:
        return (
            f"is too weak: it must mix at least {MIN_INTERNAL_TOKEN_DISTINCT} different characters "
            "(generate one with `openssl rand -base64 32`)"
        )
    return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificate files for the partner listener; a client CA turns on mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Transport and request limits applied to every listener."""

    max_receive_message_bytes: int = variable(
        "APPTGATE_MAX_MESSAGE_BYTES",
        64 * 1024,
        "largest request message accepted (`RESOURCE_EXHAUSTED` above)",
        parse=_integer,
        check=_at_least(1),
    )
    max_metadata_bytes: int = variable(
        "APPTGATE_MAX_METADATA_BYTES",
        16 * 1024,
        "largest request metadata accepted",
        parse=_integer,
        check=_at_least(1),
    )
    max_concurrent_rpcs: int = variable(
        "APPTGATE_MAX_CONCURRENT_RPCS", 1000, "calls in flight per process", parse=_integer, check=_at_least(1)
    )
    max_concurrent_streams: int = variable(
        "APPTGATE_MAX_STREAMS_PER_CONNECTION",
        100,
        "calls in flight per HTTP/2 connection",
        parse=_integer,
        check=_at_least(1),
    )
    keepalive_time_ms: int = variable(
        "APPTGATE_KEEPALIVE_TIME_MS",
        60_000,
        "milliseconds between pings of an idle peer (dead-peer detection)",
        parse=_integer,
        check=_at_least(1),
    )
    keepalive_timeout_ms: int = variable(
        "APPTGATE_KEEPALIVE_TIMEOUT_MS",
        20_000,
        "milliseconds a ping may go unanswered before the connection closes",
        parse=_integer,
        check=_at_least(1),
    )
    min_ping_interval_ms: int = variable(
        "APPTGATE_MIN_PING_INTERVAL_MS",
        10_000,
        "milliseconds a client must leave between pings; more often, or without calls, closes the connection",
        parse=_integer,
        check=_at_least(1),
    )
    max_connection_idle_ms: int = variable(
        "APPTGATE_MAX_CONNECTION_IDLE_MS",
        15 * 60_000,
        "milliseconds after which an idle connection is closed",
        parse=_integer,
        check=_at_least(1),
    )
    max_connection_age_ms: int = variable(
        "APPTGATE_MAX_CONNECTION_AGE_MS",
        60 * 60_000,
        "milliseconds after which a connection is closed (its streams resume elsewhere)",
        parse=_integer,
        check=_at_least(1),
    )
    #: Milliseconds an old connection's calls get to finish once it is told to go.
    max_connection_age_grace_ms: int = 30_000
    default_deadline: float = variable(
        "APPTGATE_DEFAULT_DEADLINE",
        10.0,
        "seconds a unary call may take when the caller sets no deadline; bounds its database work",
        parse=_number,
        check=_above(0),
    )

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

    env: Environment = variable(
        "APPTGATE_ENV",
        Environment.DEVELOPMENT,
        "`production` refuses development keys and the embedded database",
        parse=_one_of(Environment),
    )
    database_url: str | None = variable(
        "DATABASE_URL", None, "`postgresql://user@host:port/db`", shown="embedded PostgreSQL", secret=True
    )
    database_password_file: Path | None = variable(
        "APPTGATE_DATABASE_PASSWORD_FILE",
        None,
        "a file holding the password of `DATABASE_URL`'s user (it replaces one in the URL; a final line break "
        "is ignored)",
        parse=Path,
    )
    partner_database_url: str | None = variable(
        "APPTGATE_PARTNER_DATABASE_URL",
        None,
        "the partner path's own login (a session that cannot switch back to the owner); without one that logs in, "
        "partner transactions `SET LOCAL ROLE` on the main pool (refused in production)",
        shown="`DATABASE_URL` as user `apptgate_partner`",
        secret=True,
    )
    read_replica_urls: tuple[str, ...] = variable(
        "APPTGATE_READ_REPLICA_URLS",
        (),
        "comma-separated URLs of streaming replicas, each logging in as `apptgate_partner`: partners' basic reads "
        "run there, authorised again on the primary before they are recorded and sent (docs/deployment.md)",
        parse=_urls,
        shown="none",
        secret=True,
    )
    replica_max_lag: float = variable(
        "APPTGATE_REPLICA_MAX_LAG",
        5.0,
        "seconds a replica may lag behind the primary and still serve reads",
        parse=_number,
        check=_above(0),
    )
    partner_database_password_file: Path | None = variable(
        "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE",
        None,
        "a file holding the password of the partner path's login (`APPTGATE_PARTNER_DATABASE_URL`, else "
        "`apptgate_partner` at `DATABASE_URL`'s server)",
        parse=Path,
    )
    data_dir: Path = variable(
        "APPTGATE_DATA_DIR", Path(".apptgate"), "embedded database and development keys", parse=Path
    )
    ledger_witness: Path | None = variable(
        "APPTGATE_LEDGER_WITNESS",
        None,
        "append-only file where `audit verify` copies every ledger seal, one signed checkpoint per line; point it "
        "at storage the database owner cannot rewrite",
        shown="`<data dir>/ledger-witness.jsonl`",
        parse=Path,
    )
    dpo_contact: str | None = variable(
        "APPTGATE_DPO_CONTACT",
        None,
        "the data protection officer's name and contact details, as the breach dossier (`audit breach-report "
        "--format html` or `pdf`) gives them to the authority and in the letters to patients; unset, the dossier "
        "leaves a marked place for them",
    )
    partner_addr: str = variable(
        "APPTGATE_PARTNER_ADDR",
        DEFAULT_PARTNER_ADDR,
        "partner listener (`make run`: `localhost:50051`); flag `--partner-addr`",
        check=_address,
    )
    internal_addr: str = variable(
        "APPTGATE_INTERNAL_ADDR", DEFAULT_INTERNAL_ADDR, "internal listener; flag `--internal-addr`", check=_address
    )
    internal_token: str | None = variable(
        "APPTGATE_INTERNAL_TOKEN",
        None,
        f"bearer token of the internal listener: at least {MIN_INTERNAL_TOKEN_LENGTH} printable ASCII characters, "
        f"no white space, at least {MIN_INTERNAL_TOKEN_DISTINCT} different ones",
        check=_token,
        shown="required (`make run` generates one)",
        secret=True,
    )
    internal_token_file: Path | None = variable(
        "APPTGATE_INTERNAL_TOKEN_FILE",
        None,
        "a file holding `APPTGATE_INTERNAL_TOKEN` (white space around it is ignored)",
        parse=Path,
    )
    tls_cert: Path | None = variable(
        "APPTGATE_TLS_CERT", None, "PEM certificate: TLS on the partner listener; flag `--tls-cert`", parse=Path
    )
    tls_key: Path | None = variable("APPTGATE_TLS_KEY", None, "its PEM private key; flag `--tls-key`", parse=Path)
    tls_client_ca: Path | None = variable(
        "APPTGATE_TLS_CLIENT_CA",
        None,
        "PEM CA: partners must present a client certificate (mutual TLS); flag `--tls-client-ca`",
        parse=Path,
    )
    allow_insecure: bool = variable(
        "APPTGATE_ALLOW_INSECURE",
        False,
        "allow a plaintext partner listener on a non-loopback address, outside production only; flag "
        "`--allow-insecure`",
        parse=_boolean,
    )
    allow_insecure_internal: bool = variable(
        "APPTGATE_ALLOW_INSECURE_INTERNAL",
        False,
        "allow the internal listener (which has no TLS of its own) on a non-loopback address, behind a TLS "
        "proxy or mesh; flag `--allow-insecure-internal`",
        parse=_boolean,
    )
    server_secret: str | None = variable(
        "APPTGATE_SERVER_SECRET",
        None,
        "base64, at least 32 bytes: derives pseudonyms, page tokens, ledger seals. **Never change it**: partners' "
        "ids depend on it",
        shown="dev file in the data dir",
        secret=True,
    )
    server_secret_file: Path | None = variable(
        "APPTGATE_SERVER_SECRET_FILE", None, "a file holding `APPTGATE_SERVER_SECRET`", parse=Path
    )
    signing_key: str | None = variable(
        "APPTGATE_SIGNING_KEY",
        None,
        "consent-signing keys, PASERK `k4.secret.…` (the first signs, all verify; `k4.public.…` verifies only)",
        shown="dev file in the data dir",
        secret=True,
    )
    signing_key_file: Path | None = variable(
        "APPTGATE_SIGNING_KEY_FILE", None, "a file holding `APPTGATE_SIGNING_KEY`", parse=Path
    )
    data_key: str | None = variable(
        "APPTGATE_DATA_KEY",
        None,
        "data keys sealing contact details and visit reasons at rest: `<id>:<base64 32 bytes>` entries, comma- or "
        "line-separated, ids 1–65535 (the first seals, all open). **Losing a key loses what it sealed**",
        shown="dev file in the data dir",
        secret=True,
    )
    data_key_file: Path | None = variable(
        "APPTGATE_DATA_KEY_FILE", None, "a file holding `APPTGATE_DATA_KEY`", parse=Path
    )
    consent_max_ttl: timedelta = variable(
        "APPTGATE_CONSENT_MAX_TTL",
        timedelta(days=365),
        "longest consent, in seconds",
        parse=_seconds,
        check=_at_least(1, " second"),
    )
    consent_request_ttl: timedelta = variable(
        "APPTGATE_CONSENT_REQUEST_TTL",
        timedelta(hours=72),
        "seconds a consent request waits for the patient's answer before it expires",
        parse=_seconds,
        check=_at_least(1, " second"),
    )
    consent_request_daily_cap: int = variable(
        "APPTGATE_CONSENT_REQUEST_DAILY_CAP",
        500,
        "consent requests per partner and UTC day, across all processes (and 3 per patient per 30 days)",
        parse=_integer,
        check=_at_least(0),
    )
    partner_rps: float = variable(
        "APPTGATE_PARTNER_RPS",
        50.0,
        "request rate per partner, held across every process sharing the database",
        parse=_number,
        check=_above(0),
    )
    partner_burst: int = variable(
        "APPTGATE_PARTNER_BURST",
        100,
        "calls a partner may make at once; no one second holds more than the rate or this",
        parse=_integer,
        check=_at_least(1),
    )
    contact_daily_cap: int = variable(
        "APPTGATE_CONTACT_DAILY_CAP",
        1000,
        "contact disclosures per partner and UTC day, across all processes",
        parse=_integer,
        check=_at_least(0),
    )
    patient_daily_cap: int = variable(
        "APPTGATE_PATIENT_DAILY_CAP",
        5000,
        "distinct patients per partner and UTC day, across all processes",
        parse=_integer,
        check=_at_least(0),
    )
    anomaly_factor: float = variable(
        "APPTGATE_ANOMALY_FACTOR",
        10.0,
        "flag a day reaching at least max(min volume, factor × the 7-day norm) distinct patients",
        parse=_number,
        check=_above(1),
    )
    anomaly_min_volume: int = variable(
        "APPTGATE_ANOMALY_MIN_VOLUME", 5000, "the anomaly rule's min volume", parse=_integer, check=_at_least(1)
    )
    anomaly_suspend: bool = variable(
        "APPTGATE_ANOMALY_SUSPEND", False, "suspend a flagged partner until an operator lifts it", parse=_boolean
    )
    db_pool_min: int = variable(
        "APPTGATE_DB_POOL_MIN", 2, "database connections kept open per process", parse=_integer, check=_at_least(1)
    )
    db_pool_max: int = variable(
        "APPTGATE_DB_POOL_MAX", 10, "database connections per process at most", parse=_integer, check=_at_least(1)
    )
    db_connect_timeout: float = variable(
        "APPTGATE_DB_CONNECT_TIMEOUT", 5.0, "seconds to open a database connection", parse=_number, check=_above(0)
    )
    shutdown_grace: float = variable(
        "APPTGATE_SHUTDOWN_GRACE",
        10.0,
        "seconds in-flight calls get to finish on SIGTERM or SIGINT",
        parse=_number,
        check=_at_least(0),
    )
    log_level: LogLevel = variable(
        "APPTGATE_LOG_LEVEL",
        LogLevel.INFO,
        "JSON logs on stderr from this level up",
        parse=_one_of(LogLevel, upper=True),
    )
    limits: TransportLimits = field(default_factory=TransportLimits)
    workers: int = variable(
        "APPTGATE_WORKERS",
        None,
        "`serve` runs this many worker processes sharing the ports (`SO_REUSEPORT`), each with its own pools; "
        "1 = serve in this process",
        parse=_integer,
        check=lambda n: None if 1 <= n <= 256 else "from 1 to 256",
        shown="number of CPUs",
        factory=_cpus,
    )
    event_loop: EventLoop = variable(
        "APPTGATE_EVENT_LOOP",
        EventLoop.UVLOOP,
        "the event loop of `serve` and `demo`: `uvloop` (libuv sockets for gRPC and asyncpg) or `asyncio`",
        parse=_one_of(EventLoop),
    )
    reuse_port: bool = variable(
        "APPTGATE_REUSE_PORT",
        False,
        "bind the listeners with `SO_REUSEPORT` (set by `serve` for its workers)",
        parse=_boolean,
    )
    feed_buffer: int = variable(
        "APPTGATE_FEED_BUFFER",
        1000,
        "change-feed ring: changes each process keeps in memory for its streams",
        parse=_integer,
        check=_at_least(1),
    )
    feed_max_streams: int = variable(
        "APPTGATE_FEED_MAX_STREAMS",
        20,
        "change-feed streams per partner and process",
        parse=_integer,
        check=_at_least(1),
    )
    feed_retention: timedelta = variable(
        "APPTGATE_FEED_RETENTION",
        timedelta(days=7),
        "seconds a change (and a resume token) stays valid",
        parse=_seconds,
        check=_at_least(60, " seconds"),
    )
    watch_bookmark_interval: float = variable(
        "APPTGATE_WATCH_BOOKMARK_INTERVAL",
        30.0,
        "seconds a `WatchAppointments` stream that asked for bookmarks may stay quiet before it is sent one "
        "(a resume point that discloses nothing)",
        parse=_number,
        check=_above(0),
    )
    view_memo: int = variable(
        "APPTGATE_VIEW_MEMO",
        16_384,
        "basic views each process remembers, so a page listed again is not built again (docs/performance.md "
        "gives their weight); 0 turns it off",
        parse=_integer,
        check=_at_least(0),
    )
    otel_traces_exporter: Exporter = variable(
        "OTEL_TRACES_EXPORTER",
        Exporter.NONE,
        "`otlp`, `console` or `none`",
        parse=_one_of(Exporter),
        check=lambda e: (
            "expected otlp, console or none (prometheus takes metrics only)" if e == Exporter.PROMETHEUS else None
        ),
    )
    otel_metrics_exporter: Exporter = variable(
        "OTEL_METRICS_EXPORTER",
        Exporter.NONE,
        "`otlp`, `console`, `prometheus` (served for scraping on `/metrics`) or `none`",
        parse=_one_of(Exporter),
    )
    otel_prometheus_host: str = variable(
        "OTEL_EXPORTER_PROMETHEUS_HOST",
        "localhost",
        "the interface `/metrics` is served on with `OTEL_METRICS_EXPORTER=prometheus`",
    )
    otel_prometheus_port: int = variable(
        "OTEL_EXPORTER_PROMETHEUS_PORT",
        9464,
        "its port; with `APPTGATE_WORKERS` > 1, worker N (from 0) serves on this port + N",
        parse=_integer,
        check=_port,
    )
    otel_traces_protocol: OtlpProtocol = variable(
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        OtlpProtocol.HTTP,
        "`http/protobuf` or `grpc` (else `OTEL_EXPORTER_OTLP_PROTOCOL`)",
        parse=_one_of(OtlpProtocol),
    )
    otel_metrics_protocol: OtlpProtocol = variable(
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        OtlpProtocol.HTTP,
        "`http/protobuf` or `grpc` (else `OTEL_EXPORTER_OTLP_PROTOCOL`)",
        parse=_one_of(OtlpProtocol),
    )
    otel_sdk_disabled: bool = variable("OTEL_SDK_DISABLED", False, "turn every exporter off", parse=_boolean)

    @property
    def production(self) -> bool:
        """True when ``APPTGATE_ENV=production``: no development keys, no embedded database."""
        return self.env == Environment.PRODUCTION

    @property
    def witness_path(self) -> Path:
        """Where the ledger's witness is: ``APPTGATE_LEDGER_WITNESS``, else in the data directory."""
        return self.ledger_witness or self.data_dir / "ledger-witness.jsonl"

    @property
    def tls(self) -> TlsFiles | None:
        """The partner listener's certificate files, when TLS is configured."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca)


def _declared(kind: type[Any]) -> Iterator[tuple[str, Variable]]:
    """The fields of ``kind`` configured by a variable, with their declarations."""
    for declared in fields(kind):
        spec = declared.metadata.get("variable")
        if spec is not None:
            yield declared.name, spec


def variables() -> list[Variable]:
    """Every variable the service reads, in the order they are declared."""
    return [spec for _, spec in _declared(Settings)] + [spec for _, spec in _declared(TransportLimits)]


def load(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    checks: Sequence[Callable[[Settings], list[str]]] = (),
) -> Settings:
    """Build validated settings from the environment (``os.environ`` unless given) and flags.

    ``overrides`` maps field names to values given on the command line
    (``None`` values are ignored); ``defaults`` maps field names to values
    used where neither a variable nor a flag gives one. ``checks`` are the
    command's own checks (:func:`serving_problems` for a server), run on the
    settings as far as they parsed, so that one run reports their problems
    with the others. Raises :class:`ConfigError` listing every problem found.
    """
    environ = os.environ if environ is None else environ
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    problems: list[str] = []

    def read(kind: type[Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, spec in _declared(kind):
            if name in given:
                value = given[name]
                if isinstance(value, str):  # a flag's text, parsed as the variable's would be
                    try:
                        value = spec.parse(value)
                    except ValueError as exc:
                        problems.append(f"{spec.name}: {exc}")
                        continue
            else:
                text = next((environ[n] for n in spec.names if environ.get(n)), None)
                if text is None:
                    if defaults and name in defaults:
                        values[name] = defaults[name]
                    continue
                try:
                    value = spec.parse(text)
                except ValueError as exc:
                    problems.append(f"{spec.name}: {exc}")
                    continue
            complaint = spec.check(value) if spec.check is not None else None
            if complaint is not None:
                problems.append(f"{spec.name}: {complaint}")
                continue
            values[name] = value
        return values

    settings = Settings(**read(Settings), limits=TransportLimits(**read(TransportLimits)))
    problems.extend(_together(settings))
    # A variable reported bad took its default: its file, or a check, would only complain of that default again.
    reported = {problem.partition(":")[0].partition(" ")[0].removesuffix("_FILE") for problem in problems}
    settings = _with_secret_files(settings, problems, reported)
    reported |= {problem.partition(":")[0].partition(" ")[0].removesuffix("_FILE") for problem in problems}
    for check in checks:
        problems.extend(p for p in check(settings) if p.partition(":")[0].partition(" ")[0] not in reported)
    if problems:
        raise ConfigError(problems)
    return settings


def _together(s: Settings) -> list[str]:
    """The problems of values that are only wrong together."""
    problems: list[str] = []
    if s.db_pool_min > s.db_pool_max:
        problems.append("APPTGATE_DB_POOL_MIN: must not exceed APPTGATE_DB_POOL_MAX")
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("APPTGATE_TLS_CERT and APPTGATE_TLS_KEY must be set together")
    elif s.tls_client_ca is not None and s.tls_cert is None:
        problems.append("APPTGATE_TLS_CLIENT_CA needs APPTGATE_TLS_CERT and APPTGATE_TLS_KEY")
    for name, path in (
        ("APPTGATE_TLS_CERT", s.tls_cert),
        ("APPTGATE_TLS_KEY", s.tls_key),
        ("APPTGATE_TLS_CLIENT_CA", s.tls_client_ca),
    ):
        if path is not None and not path.is_file():
            problems.append(f"{name}: no such file: {path}")
    if s.production and s.database_url is None:
        problems.append("DATABASE_URL: required in production (the embedded PostgreSQL is for development)")
    return problems


def serving_problems(s: Settings, *, token_required: bool = True) -> list[str]:
    """What keeps ``s`` from serving: the listeners' transport security, the internal token, production's secrets.

    Looks at which secrets are configured, without reading them (their
    content is checked when they are loaded). A non-loopback listener without
    TLS is refused, each listener apart: the partner one in production always,
    elsewhere unless ``--allow-insecure``; the internal one, which has no TLS
    of its own, unless ``--allow-insecure-internal``. The internal token is
    required unless not ``token_required`` (the demo makes one up).
    """
    problems: list[str] = []
    if s.tls is None and not is_loopback(s.partner_addr):
        if s.production:
            problems.append(
                f"APPTGATE_PARTNER_ADDR: the partner listener {s.partner_addr} is not on loopback and has no TLS, "
                "which production refuses: set APPTGATE_TLS_CERT/APPTGATE_TLS_KEY or bind a loopback address"
            )
        elif not s.allow_insecure:
            problems.append(
                f"APPTGATE_PARTNER_ADDR: the partner listener {s.partner_addr} is not on loopback and has no TLS: "
                "set APPTGATE_TLS_CERT/APPTGATE_TLS_KEY, bind a loopback address, or pass --allow-insecure"
            )
    if not s.allow_insecure_internal and not is_loopback(s.internal_addr):
        problems.append(
            f"APPTGATE_INTERNAL_ADDR: the internal listener {s.internal_addr} is not on loopback; it has no TLS of "
            "its own, so put it behind a TLS proxy and pass --allow-insecure-internal"
        )
    if token_required and not s.internal_token:
        problems.append(
            f"APPTGATE_INTERNAL_TOKEN or APPTGATE_INTERNAL_TOKEN_FILE is required (at least "
            f"{MIN_INTERNAL_TOKEN_LENGTH} characters; generate one with `openssl rand -base64 32`)"
        )
    if s.production:
        for name, value, path in (
            ("APPTGATE_SERVER_SECRET", s.server_secret, s.server_secret_file),
            ("APPTGATE_SIGNING_KEY", s.signing_key, s.signing_key_file),
            ("APPTGATE_DATA_KEY", s.data_key, s.data_key_file),
        ):
            if not value and path is None:
                problems.append(f"{name} or {name}_FILE is required in production (development keys are refused)")
    return problems


def debug_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``APPTGATE_LOG_LEVEL`` asks for ``DEBUG``: read on its own, so it holds when other values are bad."""
    environ = os.environ if environ is None else environ
    return environ.get("APPTGATE_LOG_LEVEL", "").strip().upper() == LogLevel.DEBUG


def _with_secret_files(s: Settings, problems: list[str], reported: set[str]) -> Settings:
    """``s`` with the secrets its ``*_FILE`` variables name read in: the internal token and the database passwords.

    A secret set directly wins over its file, as for the keys. The passwords
    go into the URLs, which never appear in the settings' ``repr``. Appends
    every problem to ``problems``; a file whose variable is in ``reported``
    (set, but bad) is not read, since that variable wins over it.
    """
    changes: dict[str, Any] = {}

    def read(path: Path, name: str) -> str | None:
        try:
            return read_private_file(path, name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    if s.internal_token_file is not None and not s.internal_token and "APPTGATE_INTERNAL_TOKEN" not in reported:
        token = read(s.internal_token_file, "APPTGATE_INTERNAL_TOKEN_FILE")
        if token is not None:
            # A file usually ends with a line break; the token itself holds no white space.
            complaint = _token(token.strip())
            if complaint is None:
                changes["internal_token"] = token.strip()
            else:
                problems.append(f"APPTGATE_INTERNAL_TOKEN_FILE: the token in {s.internal_token_file} {complaint}")
    if s.database_password_file is not None:
        if s.database_url is None:
            problems.append("APPTGATE_DATABASE_PASSWORD_FILE: needs DATABASE_URL (the embedded database takes none)")
        elif (password := read(s.database_password_file, "APPTGATE_DATABASE_PASSWORD_FILE")) is not None:
            _set_password(changes, problems, "database_url", "DATABASE_URL", s.database_url, password)
    if s.partner_database_password_file is not None:
        name = "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE"
        url = s.partner_database_url
        if url is None and s.database_url is not None:
            # The partner login derived from DATABASE_URL (service.app.open_database does the same).
            url = partner_login_dsn(s.database_url)
        if url is None:
            problems.append(f"{name}: needs APPTGATE_PARTNER_DATABASE_URL or DATABASE_URL")
        elif (password := read(s.partner_database_password_file, name)) is not None:
            _set_password(changes, problems, "partner_database_url", "APPTGATE_PARTNER_DATABASE_URL", url, password)
    return replace(s, **changes) if changes else s


def _set_password(
    changes: dict[str, Any], problems: list[str], field_name: str, variable_name: str, url: str, text: str
) -> None:
    """Put the password of a password file (its text without the final line break) into ``url``."""
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        problems.append(f"{variable_name}: its password file is empty")
        return
    try:
        changes[field_name] = with_password(url, password)
    except ValueError as exc:
        problems.append(f"{variable_name}: {exc}")


def with_password(url: str, password: str) -> str:
    """``url`` (``postgresql://user@host/db``) with ``password`` as its user's password. Raises ``ValueError``.

    The message never holds the URL, which may hold another password.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("a password file needs a postgresql:// URL")
    if "password" in parse_qs(parts.query):
        # Two passwords, one in the URL's query and one in a file, and the driver would pick the URL's.
        raise ValueError("the URL holds a password parameter; with a password file, remove it")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    netloc = f"{user}:{quote(password, safe='')}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# Secret files: the checks a file must pass before its content is trusted.


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def file_problem(info: os.stat_result, path: Path, *, directory: bool = False) -> str | None:
    """Why a file (or directory) another local user could have written is not to be trusted, or None.

    Refused: not a regular file (or directory), owned by someone other than
    this process's user or root (root can change any file anyway), or
    writable by the group or others. The message ends with the command that
    fixes it.
    """
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        return f"{path} is not a {'directory' if directory else 'regular file'}"
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        return (
            f"{path} is owned by {_user_name(info.st_uid)}, not by {_user_name(me)} (the user this service runs as) "
            f"or root: chown {_user_name(me)} {path}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        return f"{path} can be written by other users (mode {mode:04o}): chmod {700 if directory else 600} {path}"
    return None


def read_private_file(path: Path, label: str) -> str:
    """The text of a file holding a secret, once it has passed :func:`file_problem`. Raises :class:`ConfigError`.

    The file is opened without following a symbolic link (``O_NOFOLLOW``) and
    checked on the open descriptor (``fstat``), so the file checked is the file
    read: nothing can swap it in between. A symbolic link is refused, since
    whoever can change it chooses the key. ``label`` (the variable) starts
    each message; no message holds the file's content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        # O_NOFOLLOW fails with ELOOP (EMLINK on some BSDs) when the last component is a link.
        if exc.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():
            raise ConfigError([f"{label}: {path} is a symbolic link: name the file itself"]) from None
        raise ConfigError([f"{label}: cannot read {path} ({exc.strerror})"]) from None
    with os.fdopen(fd, "rb") as handle:
        # Opened without blocking, so that a FIFO planted in its place cannot hang the start.
        problem = file_problem(os.fstat(handle.fileno()), path)
        if problem is not None:
            raise ConfigError([f"{label}: {problem}"])
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{label}: {path} is not UTF-8 text"]) from None


def child_environment(changes: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``changes``: what a worker process is started with."""
    return {**os.environ, **changes}


def reference() -> str:
    """The Markdown table of every variable: name, default, meaning (``docs/configuration.md``)."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for kind in (Settings, TransportLimits):
        for declared in fields(kind):
            spec = declared.metadata.get("variable")
            if spec is None:
                continue
            names = " / ".join(f"`{n}`" for n in spec.names)
            lines.append(f"| {names} | {spec.shown or _shown(declared.default)} | {spec.doc} |")
    return "\n".join(lines) + "\n"


def _shown(default: Any) -> str:
    if default is None or default is MISSING:
        return "–"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, timedelta):
        return f"`{int(default.total_seconds())}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


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
