"""What-if variants: the gateway with one of its parts replaced, to measure a change before making it.

Not a fix and not a variant to ship: it runs the gateway as ``python -m
service serve`` does (settings from the environment, one process), but
through :func:`service.app.serve`'s ``customize`` seam, which hands over the
built :class:`service.app.Parts` to be replaced with public types only. Choose
variants with ``APPTGATE_WHATIF`` (comma-separated; default ``norecord``):

* ``norecord``: a basic view's ledger record (``DisclosureRecorder.record``)
  answers ``OK`` at once; nothing is charged or recorded. No product can do
  without the record: this is the bound on what any cheaper record of
  ``ListAppointments`` and ``GetAppointment`` could gain.
* ``gather``: groups of records wait up to ``WHATIF_GATHER`` seconds (default
  0.02) for the calls underway when they form, instead of
  :class:`service.disclosure.groups.Grouping`'s default: whether longer (or
  no) gathering pays.
* ``noread``: a named read (``GetAppointment``, ``GetAppointmentContact``)
  answered from memory once the statement found that appointment for the
  partner; records are written as usual: the bound on what reading and
  recording a get in one statement could gain.
* ``nodatabase``: for ``GetAppointment`` and ``GetAppointmentContact``, no
  database work per call once each appointment was read (and its contact
  disclosed) once: named reads answered from memory after
  an appointment's first read, basic-view records answered ``OK`` at once
  (``norecord``), a contact disclosure answered from memory after the first
  for its appointment (opened and sent as usual). The rest of the gateway
  runs as it does (the error boundary, the key and request rate, pseudonyms,
  views, decryption, metrics and the access log): the bound on what any
  design of the partner path's statements could reach. The named reads are
  replaced in :mod:`service.disclosure.reads`, which builds them (they are
  not among :class:`service.app.Parts`).
* ``cold``: the memos of built views and derived pseudonyms keep nothing:
  what building a page never listed before costs (the bench lists one page
  again and again, so otherwise every view is remembered).
* ``nodefense`` (the ``gateway-nodefense`` variant of ``bench/run.py``):
  encryption at rest off on the contact path, for a ``_nodefense`` world
  (``bench/datagen.py``) whose contact values and reasons are in clear (its
  schema and partner role are as migrated). The product already passes clear values
  through (an import's); this data keyring makes sure no sealed value is
  opened instead, failing the call if one reaches it.

    APPTGATE_WHATIF=norecord python bench/whatif.py serve   # env as for `python -m service serve`
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

from service import app, models
from service import settings as settings_module
from service.cli.main import run_loop
from service.crypto.sealing import DataKeyring, SealError
from service.disclosure import reads
from service.disclosure.groups import Expected, Grouping
from service.disclosure.named_reads import NamedReads
from service.disclosure.pseudonyms import Pseudonyms
from service.disclosure.record import DisclosureRecorder
from service.disclosure.views import BasicPages
from service.store import ledger
from service.store.database import Database
from service.telemetry.logs import configure_logging

Variant = Callable[[app.Parts, Database, app.Secrets, settings_module.Settings], app.Parts]


class _RecordedAtOnce(DisclosureRecorder):
    """A recorder whose basic-view records answer ``OK`` at once (the call still counts as arrived)."""

    async def record(
        self,
        entry: models.LedgerEntry,
        items: ledger.Items,
        terms: models.ChargeTerms,
        expected: Expected | None = None,
        *,
        shown: Sequence[UUID] = (),
    ) -> models.ChargeOutcome | None:
        if expected is not None:
            expected.arrived()
        return models.ChargeOutcome.OK


class _RememberedReads(NamedReads):
    """Named reads answered from memory once the statement found the appointment for the partner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._found: dict[tuple[UUID, UUID], models.BasicAppointment] = {}

    async def read(self, principal: models.Principal, appointment_id: UUID) -> models.BasicAppointment | None:
        key = (principal.partner_id, appointment_id)
        found = self._found.get(key)
        if found is None:
            found = await super().read(principal, appointment_id)
            if found is not None:
                self._found[key] = found
        return found


class _RememberedDisclosures(_RecordedAtOnce):
    """Basic records answered at once; a contact disclosure answered from memory after its first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disclosed: dict[tuple[UUID, UUID, tuple[int, ...]], models.StoredConsentedContact] = {}

    async def disclose_contact(
        self, request: ledger.ContactRequest, terms: models.ChargeTerms, expected: Expected | None = None
    ) -> models.StoredConsentedContact:
        key = (request.entry.partner_id, request.appointment_id, tuple(request.token_fields))
        stored = self._disclosed.get(key)
        if stored is None:
            stored = await super().disclose_contact(request, terms, expected)
            if stored.consent is models.ConsentState.LIVE:
                self._disclosed[key] = stored
        elif expected is not None:
            expected.arrived()
        return stored


class _OpensNothing(DataKeyring):
    """A data keyring that seals as configured and refuses to open: the contact path must see clear values only."""

    def open(self, blob: bytes, *, table: str, column: str, row_id: UUID) -> str:
        raise SealError("whatif nodefense: a sealed value reached the contact path (not a clear world)")


def norecord(
    parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings
) -> app.Parts:
    """Basic-view records answered at once."""
    recorder = _RecordedAtOnce(database, budget=settings.limits.default_deadline, in_flight=parts.in_flight)
    return replace(parts, recorder=recorder)


def gather(parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings) -> app.Parts:
    """Groups wait ``WHATIF_GATHER`` seconds for the calls underway."""
    grouping = Grouping(gather=float(os.environ.get("WHATIF_GATHER", "0.02")))
    recorder = DisclosureRecorder(
        database, budget=settings.limits.default_deadline, grouping=grouping, in_flight=parts.in_flight
    )
    return replace(parts, recorder=recorder)


def noread(parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings) -> app.Parts:
    """Named reads answered from memory after each appointment's first."""
    reads.NamedReads = _RememberedReads  # type: ignore[attr-defined]  # the class PartnerReads builds its reads from
    return parts


def nodatabase(
    parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings
) -> app.Parts:
    """No statement per call once each appointment was read and disclosed."""
    parts = noread(parts, database, secrets, settings)
    recorder = _RememberedDisclosures(database, budget=settings.limits.default_deadline, in_flight=parts.in_flight)
    return replace(parts, recorder=recorder)


def cold(parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings) -> app.Parts:
    """Views and pseudonyms remembered nowhere."""
    return replace(parts, pages=BasicPages(0), pseudonyms=Pseudonyms(secrets.server_secret, memo_size=0))


def nodefense(
    parts: app.Parts, database: Database, secrets: app.Secrets, settings: settings_module.Settings
) -> app.Parts:
    """No decryption on the contact path."""
    if not settings.data_key:
        raise SystemExit("whatif nodefense: set APPTGATE_DATA_KEY (the bench world's key)")
    return replace(parts, data_keys=_OpensNothing.from_text(settings.data_key))


VARIANTS: dict[str, Variant] = {
    "norecord": norecord,
    "gather": gather,
    "noread": noread,
    "nodatabase": nodatabase,
    "cold": cold,
    "nodefense": nodefense,
}


def main() -> int:
    chosen = [name for name in os.environ.get("APPTGATE_WHATIF", "norecord").split(",") if name]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"whatif: unknown variants {sorted(unknown)}")
    if sys.argv[1:] != ["serve"]:
        raise SystemExit("usage: whatif.py serve")
    settings = settings_module.load()
    configure_logging(settings.log_level, sys.stderr)

    def customize(parts: app.Parts, database: Database, secrets: app.Secrets) -> app.Parts:
        for name in chosen:
            parts = VARIANTS[name](parts, database, secrets, settings)
        return parts

    print(f"whatif variants: {chosen}", file=sys.stderr, flush=True)
    run_loop(settings, app.serve(settings, customize=customize))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
