"""``python -m service partners …``: an operator's commands for partners, their keys, grants and limits.

* ``partners create --display-name NAME``; ``partners list``; ``partners show --partner ID``;
* ``partners issue-key --partner ID [--cert FILE] [--expire-time TIME]``: issue a key, its secret
  printed once; bound to the client certificate in ``FILE`` (PEM) when given (it then verifies
  only over mutual TLS with that certificate); lapsing by itself at ``TIME`` when given, so that
  keys can be rotated with an overlap;
* ``partners keys --partner ID``: the partner's keys, their state and last use, never a secret or
  a hash; ``partners revoke-key --key KEY_ID``;
* ``partners grant|revoke-grant --partner ID --practitioner ID``;
* ``partners usage|set-limits|lift --partner ID``: today's counters against the limits in force;
  override some limits (``--rps``, ``--burst``, ``--contact-cap``, ``--patient-cap``); lift a
  suspension.

Each is the ``PartnerRegistryService`` RPC of the same meaning, run in this process
(:class:`service.api.registry.PartnerRegistryApi`): the same checks, the same errors, the same
answer. ``--format json`` prints that answer with the RPC's field names (every field present,
``null`` when unset, times in RFC 3339 UTC with ``Z``, enums by their proto names), for
scripts; ``--format table``, the default, prints it for people. Bad input (an unknown partner
or key, a malformed id, a limit out of range, an expire time in the past) prints one line
``apptgate: …`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from appointments.internal.v1 import partner_registry_service_pb2 as registry_pb
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from service import app
from service.access import credentials
from service.access.limits import ExtractionGuard
from service.api.registry import MAX_PAGE_SIZE, PartnerRegistryApi
from service.disclosure.pagination import PageTokens
from service.errors import (
    AlreadyExists,
    ApptgateError,
    ConfigError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from service.settings import Settings
from service.telemetry.tracing import Telemetry
from service.timestamps import set_timestamp

if TYPE_CHECKING:
    import grpc.aio


class Format(enum.StrEnum):
    """How a command prints its answer."""

    TABLE = "table"
    JSON = "json"


#: The command-line flag of each request field, for error lines.
_FLAGS = {
    "partner_id": "--partner",
    "practitioner_id": "--practitioner",
    "display_name": "--display-name",
    "key_id": "--key",
    "expire_time": "--expire-time",
    "client_cert_sha256": "--cert",
    "requests_per_second": "--rps",
    "burst": "--burst",
    "contact_daily_cap": "--contact-cap",
    "patient_daily_cap": "--patient-cap",
}
#: The errors that mean the input was wrong, not that something failed: exit 2.
_BAD_INPUT = (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition)
#: The columns of the tables of lists (the rest is in ``--format json``).
_PARTNER_COLUMNS = ("partner_id", "display_name", "create_time")
_KEY_COLUMNS = ("key_id", "state", "create_time", "last_use_time", "expire_time", "revoke_time")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``partners`` and its commands."""
    partners = commands.add_parser(
        "partners", help="create and list partners; issue, list and revoke their keys; grants; limits"
    )
    sub = partners.add_subparsers(dest="partners_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--format",
            choices=[f.value for f in Format],
            default=Format.TABLE.value,
            help="table for people (default), json for scripts: the RPC's field names, RFC 3339 UTC times",
        )
        return parser

    def partner_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--partner", required=True, type=_uuid, metavar="ID", help="the partner id (a UUID)")

    command("create", "create a partner").add_argument(
        "--display-name", required=True, metavar="NAME", help="the partner's name, unique, at most 200 characters"
    )
    command("list", "every partner, oldest first")
    partner_flag(command("show", "one partner"))
    issue = command("issue-key", "issue a key (its secret is printed once)")
    partner_flag(issue)
    issue.add_argument("--cert", type=Path, help="the client certificate (PEM) the key verifies over, and no other")
    issue.add_argument(
        "--expire-time",
        metavar="TIME",
        help="when the key stops verifying by itself, RFC 3339 (2030-01-31T00:00:00Z); default: never",
    )
    partner_flag(command("keys", "a partner's keys: state, created, last used, expires, revoked"))
    command("revoke-key", "revoke a key: its next call answers UNAUTHENTICATED").add_argument(
        "--key", required=True, metavar="KEY_ID", help="the key id (pk_…)"
    )
    for name, help_text in (
        ("grant", "grant a partner access to a practitioner's appointments"),
        ("revoke-grant", "revoke a partner's access to a practitioner's appointments"),
    ):
        grant = command(name, help_text)
        partner_flag(grant)
        grant.add_argument(
            "--practitioner", required=True, type=_uuid, metavar="ID", help="the practitioner id (a UUID)"
        )
    partner_flag(command("usage", "today's counters against the limits in force"))
    change = command("set-limits", "override some limits of a partner")
    partner_flag(change)
    change.add_argument("--rps", metavar="R", help="calls per second per process")
    change.add_argument("--burst", metavar="N", help="calls in a burst per process")
    change.add_argument("--contact-cap", metavar="N", help="contact disclosures per UTC day")
    change.add_argument("--patient-cap", metavar="N", help="distinct patients per UTC day")
    partner_flag(command("lift", "lift a partner's suspension"))


def _uuid(text: str) -> str:
    """An id flag's value, refused as a usage error before any database is opened when it is not a UUID."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``partners`` command and print its answer; return the exit code.

    Bad input prints one line on stderr and returns 2. Raises
    :class:`~service.errors.ConfigError` for an unreadable ``--cert`` and
    :class:`~service.errors.Unavailable` when the database cannot be reached.
    """
    form = Format(args.format)
    build = _REQUESTS[args.partners_command]
    try:
        request = build(args)
        async with AsyncExitStack() as stack:
            database = await app.open_database(settings, stack)
            await database.ensure_migrated()
            # The RPC itself, in this process; its page tokens live as long as the command.
            api = PartnerRegistryApi(database, ExtractionGuard(settings, Telemetry()), PageTokens(os.urandom(32)))
            answer = await _ANSWERS[args.partners_command](api, request)
    except _BAD_INPUT as exc:
        print(f"apptgate: {describe(exc)}", file=sys.stderr)
        return 2
    print(render(answer, form))
    return 0


def describe(error: ApptgateError) -> str:
    """One line for an expected error: the flags at fault, or the message and the identifiers it names."""
    if isinstance(error, InvalidArgument) and error.violations:
        return "; ".join(f"{_FLAGS.get(v.field, v.field)}: {v.description}" for v in error.violations)
    named = ", ".join(f"{_FLAGS.get(k, k)} {v}" for k, v in error.metadata.items())
    return f"{error.message} ({named})" if named else error.message


# What each command asks: the request message, built from the flags.


def _partner(args: argparse.Namespace) -> Message:
    return registry_pb.GetPartnerRequest(partner_id=args.partner)


def _issue(args: argparse.Namespace) -> Message:
    request = registry_pb.IssuePartnerKeyRequest(partner_id=args.partner)
    if args.cert is not None:
        try:
            request.client_cert_sha256 = credentials.certificate_sha256(args.cert.read_bytes()).hex()
        except OSError as exc:
            raise ConfigError([f"--cert: cannot read {args.cert}: {exc.strerror}"]) from exc
        except ValueError as exc:
            raise ConfigError([f"--cert: {args.cert} holds no PEM certificate"]) from exc
    if args.expire_time is not None:
        set_timestamp(request.expire_time, parse_time(args.expire_time, "expire_time"))
    return request


def _limits(args: argparse.Namespace) -> Message:
    request = registry_pb.SetPartnerLimitsRequest(partner_id=args.partner)
    problems: list[FieldViolation] = []
    for field, text in (
        ("requests_per_second", args.rps),
        ("burst", args.burst),
        ("contact_daily_cap", args.contact_cap),
        ("patient_daily_cap", args.patient_cap),
    ):
        if text is None:
            continue
        rate = field == "requests_per_second"
        try:
            value: float | int = float(text) if rate else int(text)
        except ValueError:
            problems.append(FieldViolation(field, "must be a number" if rate else "must be a whole number"))
            continue
        try:
            setattr(request, field, value)
        except ValueError:  # beyond the field's 32 bits: the RPC could not even carry it
            problems.append(FieldViolation(field, "out of range"))
    if problems:
        raise InvalidArgument(problems)
    return request


def parse_time(text: str, field: str) -> datetime:
    """An RFC 3339 time with its offset (``Z`` or ``±hh:mm``), in UTC. Raises :class:`InvalidArgument`."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise InvalidArgument.field(field, "must be an RFC 3339 time with its offset, for example 2030-01-31T00:00:00Z")
    return value.astimezone(UTC)


_REQUESTS: dict[str, Callable[[argparse.Namespace], Message]] = {
    "create": lambda args: registry_pb.CreatePartnerRequest(display_name=args.display_name),
    "list": lambda args: registry_pb.ListPartnersRequest(page_size=MAX_PAGE_SIZE),
    "show": _partner,
    "issue-key": _issue,
    "keys": lambda args: registry_pb.ListPartnerKeysRequest(partner_id=args.partner, page_size=MAX_PAGE_SIZE),
    "revoke-key": lambda args: registry_pb.RevokePartnerKeyRequest(key_id=args.key),
    "grant": lambda args: registry_pb.GrantPractitionerAccessRequest(
        partner_id=args.partner, practitioner_id=args.practitioner
    ),
    "revoke-grant": lambda args: registry_pb.RevokePractitionerAccessRequest(
        partner_id=args.partner, practitioner_id=args.practitioner
    ),
    "usage": lambda args: registry_pb.GetPartnerUsageRequest(partner_id=args.partner),
    "set-limits": _limits,
    "lift": lambda args: registry_pb.LiftPartnerSuspensionRequest(partner_id=args.partner),
}

# What each command answers: the RPC's response, every page of a list gathered into one.

# The servicer's methods take the call's context for the signature's sake; none of them reads it.
_NO_CONTEXT = cast("grpc.aio.ServicerContext", None)
_Answer = Callable[[PartnerRegistryApi, Any], Awaitable[Message]]


def _every_page(name: str, field: str) -> _Answer:
    """A List RPC read to its last page, its ``field``'s items gathered in one answer."""

    async def call(api: PartnerRegistryApi, request: Any) -> Message:
        answer: Any = None
        while True:
            page = await getattr(api, name)(request, _NO_CONTEXT)
            if answer is None:
                answer = page
            else:
                getattr(answer, field).extend(getattr(page, field))
            if not page.next_page_token:
                answer.next_page_token = ""
                return cast(Message, answer)
            request.page_token = page.next_page_token

    return call


def _rpc(name: str) -> _Answer:
    async def call(api: PartnerRegistryApi, request: Any) -> Message:
        return cast(Message, await getattr(api, name)(request, _NO_CONTEXT))

    return call


_ANSWERS: dict[str, _Answer] = {
    "create": _rpc("CreatePartner"),
    "list": _every_page("ListPartners", "partners"),
    "show": _rpc("GetPartner"),
    "issue-key": _rpc("IssuePartnerKey"),
    "keys": _every_page("ListPartnerKeys", "keys"),
    "revoke-key": _rpc("RevokePartnerKey"),
    "grant": _rpc("GrantPractitionerAccess"),
    "revoke-grant": _rpc("RevokePractitionerAccess"),
    "usage": _rpc("GetPartnerUsage"),
    "set-limits": _rpc("SetPartnerLimits"),
    "lift": _rpc("LiftPartnerSuspension"),
}


# How an answer is printed.


def fields(message: Message) -> dict[str, Any]:
    """A message as JSON values under its proto field names: every field present, ``null`` when unset.

    Times are RFC 3339 UTC with ``Z`` (as the RPC's JSON mapping writes them),
    enums their value names, nested messages objects, repeated fields lists.
    A ``secret`` field appears only when set (IssuePartnerKey's answer).
    """
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.name == "secret" and not value:
            continue
        if field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        elif field.message_type is not None and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if isinstance(value, Timestamp):
        return value.ToJsonString()
    if isinstance(value, Message):
        return fields(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def render(answer: Message, form: Format) -> str:
    """The text a command prints for ``answer``."""
    data = fields(answer)
    data.pop("next_page_token", None)  # a list command gathers every page
    if form is Format.JSON:
        return json.dumps(data, indent=2, ensure_ascii=False)
    if "partners" in data:
        return _table(data["partners"], _PARTNER_COLUMNS)
    if "keys" in data:
        return _table(data["keys"], _KEY_COLUMNS)
    return _record(data)


def _cell(name: str, value: Any) -> str:
    """A value as a table shows it: times to the second, states without their prefix, ``-`` when unset."""
    if value is None or value == "":
        return "-"
    if name == "state" and isinstance(value, str):
        return value.removeprefix("PARTNER_KEY_STATE_")
    if isinstance(value, str) and _TIME.fullmatch(value):
        return value[:19] + "Z"
    return str(value)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [list(columns), *([_cell(c, row[c]) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _record(data: dict[str, Any]) -> str:
    lines: list[tuple[str, str]] = []

    def walk(values: dict[str, Any], prefix: str) -> None:
        for name, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            else:
                lines.append((prefix + name, _cell(name, value)))

    walk(data, "")
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in lines)
