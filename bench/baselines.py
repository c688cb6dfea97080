"""The two baselines the gateway is measured against, served on the partner service's method paths.

* ``bare``: a grpc.aio server that answers each method with pre-serialized
  response bytes (captured from the gateway in the same benchmark run, so the
  size is the same): no deserialization of the answer, no database — the
  transport limit of one grpc.aio process.
* ``naive``: a plain grpc.aio + asyncpg handler, what a team writes without
  this project: it selects the same rows (ListAppointments joins the same
  partner's grants, configured on the command line), builds the same messages
  with the same timestamp arithmetic, and has no authentication, no
  pseudonyms (internal UUIDs as ids), no audit ledger, no role switch, no
  transaction, no telemetry. GetAppointmentContact reads the contact columns
  with no consent check.

Both bind with ``grpc.so_reuseport = 0`` (as the gateway does), so a stale
server on the port makes the start fail instead of silently sharing the load.
``--loop uvloop`` runs them on the gateway's default event loop; ``run.py``
passes the gateway's, so that the comparison is like for like (on asyncio the
naive handler is 0-18% slower: docs/performance.md).

    python bench/baselines.py bare  --port 56061 --responses DIR
    python bench/baselines.py naive --port 56062 --dsn postgresql://… --partner-id UUID
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import grpc.aio
from appointments.partner.v1 import appointment_pb2, contact_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

SERVICE = "appointments.partner.v1.PartnerAppointmentService"
METHODS = ("ListAppointments", "GetAppointment", "GetAppointmentContact")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS = {
    "booked": appointment_pb2.APPOINTMENT_STATUS_BOOKED,
    "cancelled": appointment_pb2.APPOINTMENT_STATUS_CANCELLED,
}


# --------------------------------------------------------------------------- bare


def bare_handler(responses: dict[str, bytes]) -> grpc.GenericRpcHandler:
    """Every method answers its pre-serialized bytes (no serializer: bytes go out as they are)."""

    def make(data: bytes) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return data

        return grpc.unary_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(SERVICE, {name: make(data) for name, data in responses.items()})


# --------------------------------------------------------------------------- naive

_COLUMNS = "a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty"
_LIST = (
    f"SELECT {_COLUMNS} FROM practitioner_grants g "
    "JOIN appointments a ON a.practitioner_id = g.practitioner_id JOIN practitioners p ON p.id = g.practitioner_id "
    "WHERE g.partner_id = $1 AND g.revoke_time IS NULL AND a.start_time >= $2 AND a.start_time < $3 "
    "ORDER BY a.start_time, a.id LIMIT $4"
)
_LIST_AFTER = (
    f"SELECT {_COLUMNS} FROM practitioner_grants g "
    "JOIN appointments a ON a.practitioner_id = g.practitioner_id JOIN practitioners p ON p.id = g.practitioner_id "
    "WHERE g.partner_id = $1 AND g.revoke_time IS NULL AND a.start_time >= $2 AND a.start_time < $3 "
    "AND (a.start_time, a.id) > ($5, $6) ORDER BY a.start_time, a.id LIMIT $4"
)
_GET = f"SELECT {_COLUMNS} FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id WHERE a.id = $1"
_CONTACT = (
    "SELECT p.given_name, p.family_name, p.sex, p.phone, p.email FROM appointments a "
    "JOIN patients p ON p.id = a.patient_id WHERE a.id = $1"
)
_CURSOR = struct.Struct(">q16s")


def _set_ts(target: Any, value: datetime) -> None:
    delta = value - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def _to_dt(ts: Any) -> datetime:
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _appointment(row: asyncpg.Record) -> appointment_pb2.Appointment:
    message = appointment_pb2.Appointment(appointment_id=str(row[0]), status=_STATUS[row[4]], patient_ref=str(row[1]))
    practitioner = message.practitioner
    practitioner.practitioner_id = str(row[6])
    practitioner.display_name = row[7]
    practitioner.specialty = row[8]
    _set_ts(message.start_time, row[2])
    _set_ts(message.end_time, row[3])
    _set_ts(message.update_time, row[5])
    return message


class Naive:
    def __init__(self, pool: asyncpg.Pool, partner_id: UUID) -> None:
        self.pool = pool
        self.partner_id = partner_id

    async def ListAppointments(self, request: pb.ListAppointmentsRequest, context: Any) -> pb.ListAppointmentsResponse:
        size = request.page_size or 50
        start, end = _to_dt(request.start_time), _to_dt(request.end_time)
        if request.page_token:
            micros, raw = _CURSOR.unpack(base64.urlsafe_b64decode(request.page_token))
            after = (_EPOCH + timedelta(microseconds=micros), UUID(bytes=raw))
            rows = await self.pool.fetch(_LIST_AFTER, self.partner_id, start, end, size + 1, *after)
        else:
            rows = await self.pool.fetch(_LIST, self.partner_id, start, end, size + 1)
        page = rows[:size]
        response = pb.ListAppointmentsResponse(appointments=[_appointment(r) for r in page])
        if len(rows) > size:
            last = page[-1]
            delta = last[2] - _EPOCH
            micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            response.next_page_token = base64.urlsafe_b64encode(_CURSOR.pack(micros, last[0].bytes)).decode()
        return response

    async def GetAppointment(self, request: pb.GetAppointmentRequest, context: Any) -> appointment_pb2.Appointment:
        row = await self.pool.fetchrow(_GET, UUID(request.appointment_id))
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "appointment not found")
        return _appointment(row)

    async def GetAppointmentContact(
        self, request: pb.GetAppointmentContactRequest, context: Any
    ) -> contact_pb2.AppointmentContact:
        row = await self.pool.fetchrow(_CONTACT, UUID(request.appointment_id))
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "appointment not found")
        patient = contact_pb2.PatientContact(
            given_name=row[0], family_name=row[1], sex=row[2], phone=row[3], email=row[4]
        )
        return contact_pb2.AppointmentContact(appointment_id=request.appointment_id, patient=patient)


def naive_handler(api: Naive) -> grpc.GenericRpcHandler:
    def make(name: str, request_type: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            getattr(api, name),
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ListAppointments": make("ListAppointments", pb.ListAppointmentsRequest),
            "GetAppointment": make("GetAppointment", pb.GetAppointmentRequest),
            "GetAppointmentContact": make("GetAppointmentContact", pb.GetAppointmentContactRequest),
        },
    )


# --------------------------------------------------------------------------- main


async def serve(args: argparse.Namespace) -> None:
    pool = None
    if args.kind == "bare":
        responses = {m: (Path(args.responses) / f"{m}.bin").read_bytes() for m in METHODS
                     if (Path(args.responses) / f"{m}.bin").exists()}  # fmt: skip
        handler = bare_handler(responses)
    else:
        pool = await asyncpg.create_pool(args.dsn, min_size=args.pool_min, max_size=args.pool_max)
        handler = naive_handler(Naive(pool, UUID(args.partner_id)))
    # Exclusive bind unless several processes share the port on purpose (--reuse-port, as APPTGATE_WORKERS).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if args.reuse_port else 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{args.port}")
    await server.start()
    print(f"{args.kind} serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    if pool is not None:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("bare", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--responses", help="bare: directory of <Method>.bin files")
    parser.add_argument("--dsn", help="naive: the database")
    parser.add_argument("--partner-id", help="naive: whose grants ListAppointments joins")
    parser.add_argument("--pool-min", type=int, default=2)
    parser.add_argument("--pool-max", type=int, default=10)
    parser.add_argument("--reuse-port", action="store_true", help="share the port with sibling processes")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
