"""The listing's page builder remembers views, and a remembered view is always the one a fresh build gives."""

from __future__ import annotations

import uuid

import pytest
from appointments.partner.v1.partner_appointment_service_pb2 import ListAppointmentsResponse

from service import models
from service.disclosure import views
from service.disclosure.pseudonyms import PartnerPseudonyms

HOUR = 3_600_000_000  # microseconds


class CountingPseudonyms(PartnerPseudonyms):
    """A real codec that counts the appointment ids it is asked for: one per view built."""

    __slots__ = ("derived",)

    def __init__(self, seed: bytes) -> None:
        super().__init__(seed * 32, seed * 32, seed * 32, seed * 32)
        self.derived = 0

    def appointment_id(self, internal_id: uuid.UUID) -> str:
        self.derived += 1
        return super().appointment_id(internal_id)


def row(n: int) -> models.BasicAppointment:
    start = 1_798_761_600_000_000 + n * HOUR
    return models.BasicAppointment(
        id=uuid.UUID(int=0xA11CE000 + n),
        patient_id=uuid.UUID(int=0xB0B000 + n),
        start_time=start,
        end_time=start + HOUR // 2,
        status="booked",
        update_time=start - 24 * HOUR,
        practitioner_id=uuid.UUID(int=0xD0C + n % 2),
        practitioner_display_name=f"Dr Quillon Vexmoor {n % 2}",
        practitioner_specialty="dermatology",
    )


def built_field_by_field(rows: list[models.BasicAppointment], ids: PartnerPseudonyms) -> ListAppointmentsResponse:
    response = ListAppointmentsResponse()
    for r in rows:
        views.fill_basic_appointment(response.appointments.add(), r, ids)
    return response


def listed(
    pages: views.BasicPages, rows: list[models.BasicAppointment], ids: PartnerPseudonyms
) -> tuple[ListAppointmentsResponse, list[str]]:
    response = ListAppointmentsResponse()
    shown = pages.fill(response, rows, ids)
    return response, shown


@pytest.mark.parametrize("size", [0, 2, 16_384])
def test_a_page_is_the_page_built_field_by_field_cold_and_warm(size: int) -> None:
    rows = [row(n) for n in range(5)]
    pages = views.BasicPages(size)
    ids = CountingPseudonyms(b"\x01")
    expected = built_field_by_field(rows, ids)
    for _ in range(2):
        response, shown = listed(pages, [r._replace() for r in rows], ids)  # equal rows, new objects
        assert response == expected
        assert shown == [m.appointment_id for m in expected.appointments]
        assert len(response.appointments) == 5


def test_a_page_listed_again_builds_no_view() -> None:
    rows = [row(n) for n in range(5)]
    pages = views.BasicPages(16_384)
    ids = CountingPseudonyms(b"\x02")
    listed(pages, rows, ids)
    assert ids.derived == 5
    listed(pages, [r._replace() for r in rows], ids)
    assert ids.derived == 5
    listed(pages, [*rows[:2], row(9)], ids)
    assert ids.derived == 6


@pytest.mark.parametrize(
    "change",
    [
        {"id": uuid.UUID(int=0xFEED)},
        {"patient_id": uuid.UUID(int=0xFACE)},
        {"start_time": 1_798_761_600_000_001},
        {"end_time": 1_798_761_600_000_002},
        {"status": "cancelled"},
        {"update_time": 1_798_761_600_000_003},
        {"practitioner_id": uuid.UUID(int=0xBEEF)},
        {"practitioner_display_name": "Dr Quillon Vexmoor-Ashgrove"},
        {"practitioner_specialty": "neurology"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_row_changed_in_any_field_is_shown_as_it_is_now(change: dict) -> None:
    before = row(1)
    after = before._replace(**change)
    pages = views.BasicPages(16_384)
    ids = CountingPseudonyms(b"\x03")
    listed(pages, [before], ids)
    response, shown = listed(pages, [after], ids)
    assert response == built_field_by_field([after], ids)
    assert response != built_field_by_field([before], ids)
    assert shown == [response.appointments[0].appointment_id]


def test_each_partner_is_shown_its_own_identifiers() -> None:
    rows = [row(n) for n in range(3)]
    pages = views.BasicPages(16_384)
    first, second = CountingPseudonyms(b"\x04"), CountingPseudonyms(b"\x05")
    response_first, shown_first = listed(pages, rows, first)
    response_second, shown_second = listed(pages, rows, second)
    assert response_first == built_field_by_field(rows, first)
    assert response_second == built_field_by_field(rows, second)
    assert not set(shown_first) & set(shown_second)
    assert {m.patient_ref for m in response_first.appointments}.isdisjoint(
        m.patient_ref for m in response_second.appointments
    )


@pytest.mark.parametrize("size", [0, 4])
def test_the_memo_keeps_at_most_its_size(size: int) -> None:
    pages = views.BasicPages(size)
    ids = CountingPseudonyms(b"\x06")
    for n in range(10):
        listed(pages, [row(n)], ids)
        assert len(pages._encoded) <= size
    assert ids.derived == 10
