"""The partner contract cannot carry personal data, by construction.

These walk the generated descriptors: a careless proto edit that makes a
marked field reachable from a partner RPC fails here, before any code runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from appointments.annotations.v1 import privacy_pb2
from appointments.partner.v1 import partner_appointment_service_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.store import partner_path

PARTNER_SERVICE = partner_appointment_service_pb2.DESCRIPTOR.services_by_name["PartnerAppointmentService"]
#: The one partner RPC allowed to answer with consent-gated contact details.
CONSENT_GATED_RPCS = {"GetAppointmentContact"}
#: Marked fields partners may *send* (credentials), never receive.
ALLOWED_IN_REQUESTS = {privacy_pb2.SENSITIVITY_SECRET}
#: Credentials a partner receives for itself, reviewed: the consent token of its own approved request.
CREDENTIALS_RETURNED = {"appointments.partner.v1.ConsentRequest.consent_token"}
PERSONAL_WORDS = re.compile(r"name|sex|gender|phone|email|mail|birth|address|reason|diagnos|note", re.IGNORECASE)


def sensitivity(field: FieldDescriptor) -> int:
    return int(field.GetOptions().Extensions[privacy_pb2.sensitivity])


def consent_gated(message: Descriptor) -> bool:
    return bool(message.GetOptions().Extensions[privacy_pb2.consent_gated])


def reachable(message: Descriptor, path: str = "") -> Iterator[tuple[str, Descriptor, FieldDescriptor]]:
    """Every field reachable from ``message``, with its path and the message that holds it."""
    seen: set[str] = set()

    def walk(current: Descriptor, prefix: str) -> Iterator[tuple[str, Descriptor, FieldDescriptor]]:
        if current.full_name in seen:
            return
        seen.add(current.full_name)
        for field in current.fields:
            here = f"{prefix}.{field.name}"
            yield here, current, field
            if field.message_type is not None:
                yield from walk(field.message_type, here)

    yield from walk(message, path or message.name)


def test_no_marked_field_is_reachable_from_a_partner_rpc_outside_consent_gated_messages() -> None:
    leaks = []
    for method in PARTNER_SERVICE.methods:
        for path, holder, field in reachable(method.output_type):
            returned_credential = (
                sensitivity(field) == privacy_pb2.SENSITIVITY_SECRET and field.full_name in CREDENTIALS_RETURNED
            )
            gated = method.name in CONSENT_GATED_RPCS and consent_gated(holder)
            if sensitivity(field) and not (gated or returned_credential):
                leaks.append(f"{method.name} → {path}")
        for path, _, field in reachable(method.input_type):
            if sensitivity(field) and sensitivity(field) not in ALLOWED_IN_REQUESTS:
                leaks.append(f"{method.name} ← {path}")
    assert leaks == []


def test_medical_fields_are_unreachable_from_every_partner_rpc() -> None:
    for method in PARTNER_SERVICE.methods:
        for message in (method.input_type, method.output_type):
            assert all(sensitivity(f) != privacy_pb2.SENSITIVITY_MEDICAL for _, _, f in reachable(message))


def test_consent_gated_messages_are_only_returned_by_the_consent_gated_rpc() -> None:
    for method in PARTNER_SERVICE.methods:
        gated = {holder.full_name for _, holder, _ in reachable(method.output_type) if consent_gated(holder)}
        if consent_gated(method.output_type):
            gated.add(method.output_type.full_name)
        assert not gated or method.name in CONSENT_GATED_RPCS, method.name


def test_unmarked_partner_fields_do_not_look_personal() -> None:
    # A new field named like personal data must be marked (and so caught above),
    # or be one of the reviewed names below.
    reviewed = {"display_name", "patient_ref", "withheld_fields"}
    suspicious = []
    for method in PARTNER_SERVICE.methods:
        for path, _, field in reachable(method.output_type):
            if not sensitivity(field) and PERSONAL_WORDS.search(field.name) and field.name not in reviewed:
                suspicious.append(path)
    assert suspicious == []


def test_the_walk_would_catch_a_marked_field() -> None:
    # The checks above pass vacuously if the walk sees nothing; prove it sees
    # the consent-gated contact fields that do exist.
    contact = PARTNER_SERVICE.methods_by_name["GetAppointmentContact"].output_type
    marked = [path for path, _, field in reachable(contact) if sensitivity(field)]
    assert "AppointmentContact.patient.email" in marked
    assert "AppointmentContact.patient.given_name" in marked


# A contact or reason column, or a wildcard (`SELECT *`, `t.*`, `, *`); a `*` that multiplies is fine.
_FORBIDDEN = re.compile(r"\b(given_name|family_name|sex|phone|email|reason)\b|\bSELECT\s+\*|\.\*|,\s*\*|\*\s*FROM\b")
_READ_FUNCTIONS = (
    "partner_of_key",
    "partner_admit",
    "partner_authenticate",
    "partner_list_appointments",
    "partner_get_appointment",
    "partner_record_refusal",
    "partner_watch",
    "partner_changes",
    "partner_consent_request",
    "partner_cancel_consent_request",
    "partner_consent_request_head",
    "partner_consent_request_events",
)


def test_partner_path_sql_never_names_a_contact_or_reason_column() -> None:
    statements = [value for name, value in vars(partner_path).items() if name.isupper() or name.startswith("_")]
    sql = [s for s in statements if isinstance(s, str) and "SELECT" in s]
    assert len(sql) == 12, "the SQL of service.store.partner_path was not found"
    assert [s for s in sql if _FORBIDDEN.search(s)] == []


def test_the_partner_read_functions_never_name_a_contact_or_reason_column() -> None:
    # The statements above call these functions (the partner role's migrations); their bodies, as first
    # defined and as any later migration redefines them, are the SQL that reads.
    migrations = Path(__file__).parents[2] / "migrations"
    source = "".join(path.read_text() for path in sorted(migrations.glob("*.sql")))
    bodies = {
        name: re.findall(rf"CREATE (?:OR REPLACE )?FUNCTION {name}\(.*?\$\$(.*?)\$\$;", source, re.DOTALL)
        for name in _READ_FUNCTIONS
    }
    assert all(bodies.values()), f"a read function was not found: {bodies}"
    assert len(bodies["partner_of_key"]) == 2  # 0007's, and 0010's that refuses an expired key
    forbidden = {name: [hit for body in found for hit in _FORBIDDEN.findall(body)] for name, found in bodies.items()}
    assert {name: hits for name, hits in forbidden.items() if hits} == {}
