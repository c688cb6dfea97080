"""Every proto element is documented, and the contract names are the fixed ones."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("protos") / "set.pb"
    files = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple[int, ...]]]:
    def message(
        m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str
    ) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield name, path
        for i, f in enumerate(m.field):
            yield f"{name}.{f.name}", (*path, 2, i)
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, 3, i), f"{name}.{nested.name}")
        for i, e in enumerate(m.enum_type):
            yield from enum(e, (*path, 4, i), f"{name}.{e.name}")

    def enum(
        e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str
    ) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield name, path
        for i, v in enumerate(e.value):
            yield f"{name}.{v.name}", (*path, 2, i)

    for i, m in enumerate(file.message_type):
        yield from message(m, (4, i), m.name)
    for i, e in enumerate(file.enum_type):
        yield from enum(e, (5, i), e.name)
    for i, s in enumerate(file.service):
        yield s.name, (6, i)
        for j, method in enumerate(s.method):
            yield f"{s.name}.{method.name}", (6, i, 2, j)
    for i, ext in enumerate(file.extension):
        yield ext.name, (7, i)


def test_every_service_rpc_message_field_and_enum_value_has_a_sentence_comment(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    missing = []
    checked = 0
    ours = [f for f in descriptor_set.file if f.name.startswith("appointments/")]
    assert len(ours) >= 10
    for file in ours:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        for name, path in _elements(file):
            checked += 1
            text = comments.get(path, "")
            if not text or not text.rstrip().endswith((".", ")", ":")) or not text[0].isupper():
                missing.append(f"{file.name}: {name}")
    assert checked > 150
    assert missing == []


def test_the_contract_names_are_served() -> None:
    from appointments.internal.v1 import partner_registry_service_pb2, scheduling_service_pb2
    from appointments.partner.v1 import partner_appointment_service_pb2

    partner = partner_appointment_service_pb2.DESCRIPTOR.services_by_name["PartnerAppointmentService"]
    assert partner.full_name == "appointments.partner.v1.PartnerAppointmentService"
    assert {"ListAppointments", "GetAppointment"} <= set(partner.methods_by_name)
    request = partner.methods_by_name["ListAppointments"].input_type
    assert [f.name for f in request.fields] == ["practitioner_id", "start_time", "end_time", "page_size", "page_token"]
    appointment = partner.methods_by_name["GetAppointment"].output_type
    assert appointment.full_name == "appointments.partner.v1.Appointment"
    assert [f.name for f in appointment.fields] == [
        "appointment_id",
        "practitioner",
        "start_time",
        "end_time",
        "status",
        "patient_ref",
        "update_time",
    ]
    scheduling = scheduling_service_pb2.DESCRIPTOR.services_by_name["SchedulingService"]
    assert set(scheduling.methods_by_name) == {
        "CreatePractitioner",
        "CreatePatient",
        "CreateAppointment",
        "CancelAppointment",
    }
    registry = partner_registry_service_pb2.DESCRIPTOR.services_by_name["PartnerRegistryService"]
    assert set(registry.methods_by_name) >= {
        "CreatePartner",
        "IssuePartnerKey",
        "RevokePartnerKey",
        "GrantPractitionerAccess",
        "RevokePractitionerAccess",
    }
