"""The grpcurl walk-through ``make run`` prints: shell variables, then commands that work as pasted. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

PARTNER_SERVICE = "appointments.partner.v1.PartnerAppointmentService"
CONSENT_SERVICE = "appointments.internal.v1.ConsentService"


@dataclass(frozen=True, slots=True)
class DemoValues:
    """The values the commands need, as the demo created them."""

    partner_address: str
    internal_address: str
    partner_key: str
    internal_token: str
    partner_id: str
    practitioner_id: str
    patient_id: str
    appointment_id: str
    week_start: datetime


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _pick(variable: str, *path: str | int) -> str:
    """A pipeline printing one value of the JSON held in ``$variable``: the keys and indexes of ``path``, in turn."""
    subscripts = "".join(f'["{step}"]' if isinstance(step, str) else f"[{step}]" for step in path)
    return f"echo \"${variable}\" | python3 -c 'import json,sys; print(json.load(sys.stdin){subscripts})'"


def variables(values: DemoValues) -> dict[str, str]:
    """The shell variables the commands use."""
    return {
        "PARTNER": values.partner_address,
        "INTERNAL": values.internal_address,
        "KEY": values.partner_key,
        "INTERNAL_TOKEN": values.internal_token,
        "PARTNER_ID": values.partner_id,
        "PRACTITIONER_ID": values.practitioner_id,
        "PATIENT_ID": values.patient_id,
        "APPOINTMENT_ID": values.appointment_id,
        "START": _time(values.week_start),
        "END": _time(values.week_start + timedelta(days=7)),
    }


#: (comment, command, succeeds) — each command is one line of POSIX shell.
COMMANDS: tuple[tuple[str, str, bool], ...] = (
    ("What the partner listener offers (reflection needs no credentials)", "grpcurl -plaintext $PARTNER list", True),
    (
        "The basic view, with its comments",
        "grpcurl -plaintext $PARTNER describe appointments.partner.v1.Appointment",
        True,
    ),
    (
        "The partner's appointments this week (basic view: no name, no contact, no reason)",
        'grpcurl -plaintext -H "authorization: Bearer $KEY" '
        '-d "{\\"start_time\\": \\"$START\\", \\"end_time\\": \\"$END\\", \\"page_size\\": 5}" '
        f"$PARTNER {PARTNER_SERVICE}/ListAppointments",
        True,
    ),
    (
        "One appointment by its partner-scoped id",
        'grpcurl -plaintext -H "authorization: Bearer $KEY" -d "{\\"appointment_id\\": \\"$APPOINTMENT_ID\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/GetAppointment",
        True,
    ),
    (
        "Contact details without a consent token: PERMISSION_DENIED, reason CONSENT_REQUIRED",
        'grpcurl -plaintext -H "authorization: Bearer $KEY" -d "{\\"appointment_id\\": \\"$APPOINTMENT_ID\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/GetAppointmentContact",
        False,
    ),
    (
        "The patient consents (internal listener): email only, for one hour; keep the token and the consent id",
        'CONSENT=$(grpcurl -plaintext -H "authorization: Bearer $INTERNAL_TOKEN" '
        '-d "{\\"patient_id\\": \\"$PATIENT_ID\\", \\"partner_id\\": \\"$PARTNER_ID\\", '
        '\\"fields\\": [\\"CONTACT_FIELD_EMAIL\\"], \\"ttl\\": \\"3600s\\", \\"purpose\\": \\"reminders\\"}" '
        "$INTERNAL appointments.internal.v1.ConsentService/GrantConsent) && "
        'TOKEN=$(echo "$CONSENT" | python3 -c \'import json,sys; print(json.load(sys.stdin)["token"])\') && '
        'CONSENT_ID=$(echo "$CONSENT" | python3 -c \'import json,sys; print(json.load(sys.stdin)["consentId"])\') && '
        'echo "consent $CONSENT_ID"',
        True,
    ),
    (
        "Contact details with the token: only the email, the other fields listed as withheld",
        'grpcurl -plaintext -H "authorization: Bearer $KEY" '
        '-d "{\\"appointment_id\\": \\"$APPOINTMENT_ID\\", \\"consent_token\\": \\"$TOKEN\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/GetAppointmentContact",
        True,
    ),
    (
        "The patient revokes; the next use of the token answers CONSENT_REVOKED",
        'grpcurl -plaintext -H "authorization: Bearer $INTERNAL_TOKEN" -d "{\\"consent_id\\": \\"$CONSENT_ID\\"}" '
        "$INTERNAL appointments.internal.v1.ConsentService/RevokeConsent",
        True,
    ),
    (
        "The partner asks the patient itself, for phone and email (the patient app shows the purpose and the message);"
        " keep the request id. At most 3 requests per patient in 30 days, then RESOURCE_EXHAUSTED",
        'REQUEST=$(grpcurl -plaintext -H "authorization: Bearer $KEY" '
        '-d "{\\"appointment_id\\": \\"$APPOINTMENT_ID\\", '
        '\\"fields\\": [\\"CONTACT_FIELD_PHONE\\", \\"CONTACT_FIELD_EMAIL\\"], '
        '\\"purpose\\": \\"appointment reminders by text message\\", '
        '\\"message\\": \\"We would like to text you the day before your visit.\\", \\"ttl\\": \\"86400s\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/RequestContactAccess) && "
        f"REQUEST_ID=$({_pick('REQUEST', 'consentRequestId')}) && "
        'echo "$REQUEST"',
        True,
    ),
    (
        "The patient app lists the patient's pending requests (internal listener); keep the newest one's internal id",
        'PENDING=$(grpcurl -plaintext -H "authorization: Bearer $INTERNAL_TOKEN" '
        '-d "{\\"patient_id\\": \\"$PATIENT_ID\\", \\"states\\": [\\"CONSENT_REQUEST_STATE_PENDING\\"]}" '
        f"$INTERNAL {CONSENT_SERVICE}/ListConsentRequests) && "
        f"PENDING_ID=$({_pick('PENDING', 'consentRequests', 0, 'consentRequestId')}) && "
        'echo "$PENDING"',
        True,
    ),
    (
        "The patient approves it narrower: the phone only, for one hour",
        'grpcurl -plaintext -H "authorization: Bearer $INTERNAL_TOKEN" '
        '-d "{\\"consent_request_id\\": \\"$PENDING_ID\\", \\"fields\\": [\\"CONTACT_FIELD_PHONE\\"], '
        '\\"ttl\\": \\"3600s\\"}" '
        f"$INTERNAL {CONSENT_SERVICE}/ApproveConsentRequest",
        True,
    ),
    (
        "The partner reads its request: APPROVED, with a consent token for exactly the granted fields; keep the token",
        'APPROVED=$(grpcurl -plaintext -H "authorization: Bearer $KEY" '
        '-d "{\\"consent_request_id\\": \\"$REQUEST_ID\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/GetConsentRequest) && "
        f"REQUEST_TOKEN=$({_pick('APPROVED', 'consentToken')}) && "
        'echo "$APPROVED"',
        True,
    ),
    (
        "Contact details with that token: the phone only",
        'grpcurl -plaintext -H "authorization: Bearer $KEY" '
        '-d "{\\"appointment_id\\": \\"$APPOINTMENT_ID\\", \\"consent_token\\": \\"$REQUEST_TOKEN\\"}" '
        f"$PARTNER {PARTNER_SERVICE}/GetAppointmentContact",
        True,
    ),
    (
        "Every disclosure to the partner this week, as a breach-scope report",
        'grpcurl -plaintext -H "authorization: Bearer $INTERNAL_TOKEN" '
        '-d "{\\"partner_id\\": \\"$PARTNER_ID\\", \\"start_time\\": \\"2000-01-01T00:00:00Z\\", '
        '\\"end_time\\": \\"2100-01-01T00:00:00Z\\"}" $INTERNAL appointments.internal.v1.AuditService/BreachReport',
        True,
    ),
    ("Health, without credentials", "grpcurl -plaintext $PARTNER grpc.health.v1.Health/Check", True),
)


#: The last line the demo prints: everything above it is printed, and the demo serves.
READY = "Ready: the demo serves until Ctrl-C."

_PROGRAM = re.compile(r"(?<![\w/.-])grpcurl(?= -plaintext)")


def command_lines(grpcurl: str = "grpcurl") -> list[str]:
    """The commands of :data:`COMMANDS` with ``grpcurl`` (a path, quoted for the shell) as the program they run."""
    return [_PROGRAM.sub(lambda _: grpcurl, command) for _, command, _ in COMMANDS]


def render(values: DemoValues, *, grpcurl: str = "grpcurl", notes: tuple[str, ...] = ()) -> str:
    """The text ``make run`` prints: variables, commands running ``grpcurl``, then ``notes`` and :data:`READY`."""
    lines = ["", "apptgate demo is serving. In another terminal, set these variables:", ""]
    lines += [f"export {name}='{value}'" for name, value in variables(values).items()]
    lines += ["", "then paste any of these:", ""]
    for (comment, _, _), command in zip(COMMANDS, command_lines(grpcurl), strict=True):
        lines += [f"# {comment}", command, ""]
    lines += [*notes, READY, ""]
    return "\n".join(lines)
