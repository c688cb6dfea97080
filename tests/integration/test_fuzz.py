"""Every RPC of both listeners, fed generated messages built from the proto descriptors, and raw frames.

Random fields, boundary numbers, huge and nested values, unknown enum numbers,
invalid timestamps, and bytes that are not protobuf or not UTF-8: the server
must answer each with a precise status — never INTERNAL or UNKNOWN — and stay
healthy. ``make fuzz`` runs the same with a much larger budget
(APPTGATE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import Gateway

EXAMPLES = int(os.environ.get("APPTGATE_FUZZ_EXAMPLES", "250"))
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVICES = [
    harness.partner_pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"],
    harness.scheduling_pb.DESCRIPTOR.services_by_name["SchedulingService"],
    harness.registry_pb.DESCRIPTOR.services_by_name["PartnerRegistryService"],
    harness.consent_pb.DESCRIPTOR.services_by_name["ConsentService"],
    harness.audit_pb.DESCRIPTOR.services_by_name["AuditService"],
]
METHODS = [method for service in SERVICES for method in service.methods]
_INT32 = st.one_of(st.sampled_from([0, 1, -1, 50, 500, 501, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
_INT64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63), 253402300800]), st.integers(-(2**63), 2**63 - 1))
_WELL_FORMED = st.one_of(
    st.uuids().map(str),
    st.sampled_from(["apt_" + "a" * 26, "pk_" + "a" * 16 + "." + "A" * 43, "+33612345678", "a@b.example"]),
)
# A well-formed value with whitespace or a control character before or after it: a pattern anchored
# with `$` accepts a final newline, and what follows the check may not.
_EDGE = st.sampled_from(["\n", "\r\n", " ", "\t", "\x00", "\x0b", "\x85", "\u2028", "\ufeff"])
_DECORATED = st.tuples(_WELL_FORMED, _EDGE, st.booleans()).map(
    lambda parts: parts[0] + parts[1] if parts[2] else parts[1] + parts[0]
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(min_size=1000, max_size=3000),
    _WELL_FORMED,
    _DECORATED,
    st.sampled_from(["", " ", "v4.public.xxxx", "\x00", "\ud7ff"]),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kinds: dict[int, st.SearchStrategy[Any]] = {
        FieldDescriptor.TYPE_STRING: _TEXT,
        FieldDescriptor.TYPE_BYTES: st.binary(max_size=200),
        FieldDescriptor.TYPE_BOOL: st.booleans(),
        FieldDescriptor.TYPE_INT32: _INT32,
        FieldDescriptor.TYPE_SINT32: _INT32,
        FieldDescriptor.TYPE_ENUM: _INT32,  # unknown numbers included
        FieldDescriptor.TYPE_INT64: _INT64,
        FieldDescriptor.TYPE_SINT64: _INT64,
        FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
        FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
        FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True),
        FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True),
    }
    return kinds[field.type]


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of ``descriptor`` with any subset of fields set to hostile values."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                count = draw(st.integers(0, 3)) if field.is_repeated else 1
                for _ in range(count):
                    raw = draw(message_strategy(field.message_type, depth + 1))
                    target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                    target.MergeFromString(raw)
            elif field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=6)))
            else:
                setattr(message, field.name, draw(_scalar(field)))
        return message.SerializeToString()

    return build()


RAW_FRAMES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\x0a\x02\xff\xfe", b"\x12\x03\xc3\x28\x41", b"\x0a", b"\xff" * 20, b"\x08" + b"\xff" * 11]),
    st.binary(max_size=60).map(lambda b: b"\x0a" + bytes([len(b)]) + b),  # a string field with arbitrary bytes
)


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes, metadata: Any) -> grpc.StatusCode:
    try:
        if method.server_streaming:
            stream = channel.unary_stream(_path(method))(payload, metadata=metadata, timeout=10)
            # The server sends its headers once the stream is live, or ends the call before that:
            # either way the answer is in, however long the server took to give it.
            await stream.initial_metadata()
            if not stream.done():
                stream.cancel()
                return grpc.StatusCode.OK  # a live stream with nothing to send: fine
            return await stream.code()
        await channel.unary_unary(_path(method))(payload, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def targets(world: World) -> dict[str, tuple[grpc.aio.Channel, Any]]:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Fuzzed", practitioner)
    return {
        "appointments.partner.v1": (world.partner_channel, partner.metadata),
        "appointments.internal.v1": (world.internal_channel, world.internal_metadata),
    }


@settings(max_examples=EXAMPLES * len(METHODS) // 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_generated_messages_never_get_internal_or_unknown(
    targets: dict[str, tuple[grpc.aio.Channel, Any]], data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(METHODS), label="method")
    payload = data.draw(message_strategy(method.input_type), label="payload")
    channel, credentials = targets[method.containing_service.file.package]
    metadata = data.draw(st.sampled_from([credentials, (), (("authorization", "Bearer nope"),)]), label="metadata")

    code = await _call(channel, method, payload, metadata)

    assert code not in FORBIDDEN, f"{_path(method)} answered {code.name}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_raw_frames_that_do_not_decode_never_get_internal_or_unknown(
    targets: dict[str, tuple[grpc.aio.Channel, Any]], data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(METHODS), label="method")
    payload = data.draw(RAW_FRAMES, label="payload")
    channel, credentials = targets[method.containing_service.file.package]

    code = await _call(channel, method, payload, credentials)

    assert code not in FORBIDDEN, f"{_path(method)} answered {code.name}"


async def test_oversized_messages_and_metadata_are_refused_precisely(
    targets: dict[str, tuple[grpc.aio.Channel, Any]], gateway: Gateway
) -> None:
    channel, credentials = targets["appointments.partner.v1"]
    list_method = SERVICES[0].methods_by_name["ListAppointments"]
    huge = harness.partner_pb.ListAppointmentsRequest(page_token="x" * 200_000).SerializeToString()

    assert await _call(channel, list_method, huge, credentials) == grpc.StatusCode.RESOURCE_EXHAUSTED
    big_metadata = (*credentials, ("x-padding", "y" * 40_000))
    assert await _call(channel, list_method, b"", big_metadata) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gateway.partner is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.partner.port}") as fresh:
        reply = await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_server_is_healthy_and_serving_after_the_fuzzing(
    targets: dict[str, tuple[grpc.aio.Channel, Any]], world: World
) -> None:
    channel, _ = targets["appointments.partner.v1"]
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    partner = await world.partner("After", await world.practitioner())

    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (await partner.list()).appointments == []
