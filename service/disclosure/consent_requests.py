"""Consent requests, from the partner that asks to the patient who answers, and the token in between.

A partner asks (:meth:`ConsentRequests.request`) for an appointment it can
see: the partner path reads the appointment first, which verifies the key and
the grant, and records a refused probe like every other not-yours; then one
statement applies the caps, makes the request and writes its ledger record.
The patient app lists a patient's requests and approves (as asked, or
narrower) or denies them (:meth:`ConsentRequests.approve`,
:meth:`ConsentRequests.deny`); an approval grants the consent exactly as
``GrantConsent`` does, to the requesting partner, and is recorded in the
ledger. The token is never stored: it is signed again from the consent
whenever the partner reads its request (Ed25519 signatures are
deterministic, so it is the same token while the signing key is), and only
while the consent is live. Pending requests lapse after
``APPTGATE_CONSENT_REQUEST_TTL``: each read shows a lapsed request as
expired, and a sweep in every process (:mod:`service.sweeps`, with
:func:`service.store.consent_requests.expire_lapsed`) records it, once, so its
event reaches the partner's stream.

The purpose and message are the partner's text, sealed at rest and never
logged or traced; the partner gets its purpose back, the message only the
patient sees.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from appointments.partner.v1 import consent_request_pb2

from service import models
from service.access.consent_tokens import ConsentClaims, ConsentKeyring
from service.access.gate import PartnerGate
from service.crypto import sealing
from service.disclosure import views
from service.disclosure.pseudonyms import PartnerPseudonyms, Pseudonyms, looks_like_consent_request_id
from service.disclosure.reads import PartnerReads
from service.disclosure.record import entry
from service.errors import (
    AlreadyExists,
    ApptgateError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExhausted,
)
from service.store import consent_requests, consents, partner_path
from service.store.database import Database
from service.telemetry.tracing import current_trace_id

_REQUEST = "RequestContactAccess"
#: The internal method an approval's ledger record names.
_APPROVE_RPC = "/appointments.internal.v1.ConsentService/ApproveConsentRequest"
#: Requests a partner may make to one patient within :data:`PATIENT_WINDOW`, so patients are not pestered.
PATIENT_CAP = 3
PATIENT_WINDOW = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A validated RequestContactAccess."""

    appointment_id: str
    fields: tuple[int, ...]
    purpose: str
    message: str
    ttl: timedelta


@dataclass(frozen=True, slots=True)
class Decision:
    """A validated approval: the fields and duration released, ``None`` for "as asked"."""

    request_id: UUID
    fields: tuple[int, ...] | None
    ttl: timedelta | None


class ConsentRequests:
    """Makes, shows and settles consent requests."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        reads: PartnerReads,
        ids: Pseudonyms,
        keyring: ConsentKeyring,
        data_keys: sealing.DataKeyring,
        *,
        lapse: timedelta,
        daily_cap: int,
    ) -> None:
        self._db = database
        self._gate = gate
        self._reads = reads
        self._ids = ids
        self._keyring = keyring
        self._data_keys = data_keys
        self._caps = consent_requests.Caps(lapse, daily_cap, PATIENT_CAP, PATIENT_WINDOW)

    # The partner's side.

    async def request(self, principal: models.Principal, new: NewRequest) -> consent_request_pb2.ConsentRequest:
        """Make a request for an appointment the partner can see.

        Raises NOT_FOUND (recorded) for one it cannot, ALREADY_EXISTS naming
        the pending request of the same patient and fields, RESOURCE_EXHAUSTED
        for a cap (recorded).
        """
        ids = self._ids.for_partner(principal.partner_id)
        row = await self._reads.named_appointment(principal, ids, new.appointment_id, _REQUEST, models.View.CONTACT)
        request_id = uuid.uuid4()
        sealed_purpose, sealed_message = sealing.seal_request_text(
            self._data_keys, request_id, new.purpose, new.message
        )
        record = entry(principal, _REQUEST, models.View.CONTACT)
        async with self._db.transaction() as conn:
            result = await consent_requests.request_access(
                conn,
                consent_requests.NewRequest(
                    request_id,
                    principal.partner_id,
                    principal.key_id,
                    row.id,
                    row.patient_id,
                    new.appointment_id,
                    new.fields,
                    sealed_purpose,
                    sealed_message,
                    new.ttl,
                    record.rpc,
                    record.trace_id,
                    record.client_cert,
                ),
                self._caps,
            )
        if result.outcome is consent_requests.RequestOutcome.DUPLICATE:
            assert result.request_id is not None
            raise AlreadyExists(
                "a request for these fields of this patient is pending",
                reason="CONSENT_REQUEST_PENDING",
                metadata={"consent_request_id": ids.consent_request_id(result.request_id)},
            )
        if result.outcome is not consent_requests.RequestOutcome.CREATED:
            raise _cap_error(result)
        return await self.get(principal, ids.consent_request_id(request_id))

    async def get(self, principal: models.Principal, public_id: str) -> consent_request_pb2.ConsentRequest:
        """One of the partner's requests; NOT_FOUND for another partner's or none."""
        ids = self._ids.for_partner(principal.partner_id)
        request_id = _parse_id(ids, public_id)
        async with self._db.partner_statements() as conn:
            try:
                row = await partner_path.consent_request(conn, principal, request_id)
            except partner_path.ReadRefused as refused:
                raise self._gate.refused(refused, principal) from None
        if row is None:
            raise NotFound("consent request not found")
        return self.partner_view(principal.partner_id, row, row.state)

    async def cancel(self, principal: models.Principal, public_id: str) -> consent_request_pb2.ConsentRequest:
        """Cancel one of the partner's pending requests; FAILED_PRECONDITION when it is no longer pending."""
        ids = self._ids.for_partner(principal.partner_id)
        request_id = _parse_id(ids, public_id)
        async with self._db.partner_statements() as conn:
            try:
                done = await partner_path.cancel_consent_request(conn, principal, request_id)
            except partner_path.ReadRefused as refused:
                raise self._gate.refused(refused, principal) from None
        if done is partner_path.Cancellation.NOT_FOUND:
            raise NotFound("consent request not found")
        if done is partner_path.Cancellation.NOT_PENDING:
            raise FailedPrecondition(
                "the consent request is no longer pending",
                reason="CONSENT_REQUEST_NOT_PENDING",
                metadata={"consent_request_id": public_id},
            )
        return await self.get(principal, public_id)

    def partner_view(
        self, partner_id: UUID, row: models.PartnerConsentRequest, state: models.ConsentRequestState
    ) -> consent_request_pb2.ConsentRequest:
        """The partner's message of ``row`` in ``state``, with the token while its consent is live."""
        ids = self._ids.for_partner(partner_id)
        purpose = sealing.open_request_text(self._data_keys, row.id, "purpose", row.sealed_purpose)
        token = ""
        consent = row.consent
        now = datetime.now(UTC)
        if consent is not None and consent.revoke_time is None and consent.expire_time > now:
            claims = ConsentClaims(
                ids.consent_ref(consent.id),
                ids.patient_ref(row.patient_id),
                partner_id,
                row.granted_fields,
                consent.purpose,
                consent.create_time,
                consent.expire_time,
            )
            token = self._keyring.sign(claims)
        return views.consent_request(row, ids, purpose=purpose, state=state, token=token)

    # The patient's side (the internal ConsentService).

    async def list_for_patient(
        self,
        patient_id: UUID,
        states: tuple[models.ConsentRequestState, ...],
        before: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[models.PatientConsentRequest]:
        """A patient's requests, newest first; NOT_FOUND for an unknown patient."""
        async with self._db.transaction(readonly=True) as conn:
            return await consent_requests.for_patient(conn, patient_id, states, before=before, limit=limit)

    def opened_text(self, row: models.PatientConsentRequest) -> tuple[str, str]:
        """A request's purpose and message, opened for the patient app."""
        return (
            sealing.open_request_text(self._data_keys, row.id, "purpose", row.sealed_purpose),
            sealing.open_request_text(self._data_keys, row.id, "message", row.sealed_message),
        )

    async def approve(self, decision: Decision) -> models.PatientConsentRequest:
        """Approve a pending request, as asked or narrower, granting its consent and recording it.

        Raises NOT_FOUND, FAILED_PRECONDITION for a settled request, and
        INVALID_ARGUMENT for fields not asked for or a longer ttl.
        """
        settled: ApptgateError | None = None
        async with self._db.transaction() as conn:
            row = await consent_requests.for_decision(conn, decision.request_id)
            if row.state is not models.ConsentRequestState.PENDING:
                settled = _not_pending(row)
            else:
                fields, ttl = _narrowed(row, decision)
                purpose, _ = self.opened_text(row)
                now = datetime.now(UTC)
                consent = models.Consent(
                    uuid.uuid4(),
                    row.patient_id,
                    row.partner_id,
                    fields,
                    purpose,
                    self._keyring.active_key_id,
                    now,
                    now + ttl,
                    None,
                )
                await consents.insert(conn, consent)
                await consent_requests.approve(
                    conn,
                    row,
                    consent,
                    requested_id=self._ids.for_partner(row.partner_id).appointment_id(row.appointment_id),
                    rpc=_APPROVE_RPC,
                    trace_id=current_trace_id(),
                )
                row = await consent_requests.get(conn, row.id)
        # Raised after the commit: a request found lapsed stays recorded as expired.
        if settled is not None:
            raise settled
        return row

    async def deny(self, request_id: UUID) -> models.PatientConsentRequest:
        """Deny a pending request. Raises NOT_FOUND, FAILED_PRECONDITION for a settled request."""
        settled: ApptgateError | None = None
        async with self._db.transaction() as conn:
            row = await consent_requests.for_decision(conn, request_id)
            if row.state is not models.ConsentRequestState.PENDING:
                settled = _not_pending(row)
            else:
                await consent_requests.deny(conn, request_id)
                row = await consent_requests.get(conn, request_id)
        if settled is not None:
            raise settled
        return row


def _parse_id(ids: PartnerPseudonyms, public_id: str) -> UUID:
    if not public_id:
        raise InvalidArgument.field("consent_request_id", "is required")
    if not looks_like_consent_request_id(public_id):
        raise InvalidArgument.field("consent_request_id", "not a consent request id")
    return ids.parse_consent_request_id(public_id)


def _not_pending(row: models.PatientConsentRequest) -> FailedPrecondition:
    return FailedPrecondition(
        f"the consent request is {row.state.value}, no longer pending",
        reason="CONSENT_REQUEST_NOT_PENDING",
        metadata={"consent_request_id": str(row.id), "state": row.state.name},
    )


def _narrowed(row: models.PatientConsentRequest, decision: Decision) -> tuple[tuple[int, ...], timedelta]:
    """The fields and duration an approval releases: what was asked, or less. Raises INVALID_ARGUMENT."""
    problems: list[FieldViolation] = []
    fields = row.fields if decision.fields is None else decision.fields
    wider = sorted(set(fields) - set(row.fields))
    if wider:
        names = ", ".join(models.ContactField(f).name for f in wider)
        problems.append(FieldViolation("fields", f"were not asked for: {names}"))
    ttl = row.ttl if decision.ttl is None else decision.ttl
    if ttl > row.ttl:
        asked = math.floor(row.ttl.total_seconds())
        problems.append(FieldViolation("ttl", f"must be at most the {asked} seconds asked for"))
    if problems:
        raise InvalidArgument(problems)
    return fields, ttl


def _cap_error(result: consent_requests.RequestResult) -> QuotaExhausted:
    retry = 1.0
    if result.retry_time is not None:
        retry = max(1.0, math.ceil((result.retry_time - datetime.now(UTC)).total_seconds()))
    if result.outcome is consent_requests.RequestOutcome.DAILY_CAP:
        return QuotaExhausted(
            "the daily consent request cap is reached",
            subject="partner",
            description="consent requests per partner and UTC day (APPTGATE_CONSENT_REQUEST_DAILY_CAP)",
            retry_delay=retry,
            reason="CONSENT_REQUEST_DAILY_CAP",
        )
    return QuotaExhausted(
        f"at most {PATIENT_CAP} consent requests per patient in {PATIENT_WINDOW.days} days",
        subject="patient",
        description=f"consent requests to one patient per {PATIENT_WINDOW.days} days ({PATIENT_CAP})",
        retry_delay=retry,
        reason="CONSENT_REQUEST_PATIENT_CAP",
    )
