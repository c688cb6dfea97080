"""The partner path without a partner login: the same answers when it switches role on the main pool.

Where the database refuses the ``apptgate_partner`` login and none is
configured, the gateway runs each partner call in one transaction that
switches role (``SET LOCAL ROLE``) instead of single statements on a pool
logged in as that role (``Database.partner_statements``). The tests imported
below run here again with that fallback: grants, revocation, NOT_FOUND (whose
denial record must survive the refused statement), paging and the consented
contact read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_audit import (
    test_a_contact_disclosure_records_its_fields_and_consent,
    test_listing_a_practitioner_not_granted_is_recorded_as_denied,
    test_refused_attempts_are_recorded_as_denied,
)
from test_consent_contact import (
    scene,  # noqa: F401  (a fixture the imported tests use)
    test_a_full_consent_releases_every_contact_field,
    test_a_revoked_consent_is_refused_on_the_next_use,
    test_an_appointment_the_partner_cannot_see_is_not_found_even_with_a_valid_token,
)
from test_partner_access import (
    test_a_page_token_grants_nothing_after_revocation,
    test_a_revoked_grant_takes_effect_on_the_next_call,
    test_a_revoked_key_fails_on_its_next_call,
    test_listing_a_practitioner_not_granted_is_not_found,
    test_not_yours_answers_exactly_like_nonexistent,
    test_partners_see_only_practitioners_that_granted_them,
)

from service.store.database import Database

__all__ = [
    "test_a_contact_disclosure_records_its_fields_and_consent",
    "test_a_full_consent_releases_every_contact_field",
    "test_a_page_token_grants_nothing_after_revocation",
    "test_a_revoked_consent_is_refused_on_the_next_use",
    "test_a_revoked_grant_takes_effect_on_the_next_call",
    "test_a_revoked_key_fails_on_its_next_call",
    "test_an_appointment_the_partner_cannot_see_is_not_found_even_with_a_valid_token",
    "test_listing_a_practitioner_not_granted_is_not_found",
    "test_listing_a_practitioner_not_granted_is_recorded_as_denied",
    "test_not_yours_answers_exactly_like_nonexistent",
    "test_partners_see_only_practitioners_that_granted_them",
    "test_refused_attempts_are_recorded_as_denied",
]


@pytest.fixture
async def database(database_dsn: str) -> AsyncIterator[Database]:
    """One pool, no partner login: partner calls switch role inside a transaction."""
    db = await Database.connect(database_dsn, min_size=1, max_size=5)
    assert not db.partner_logins
    try:
        yield db
    finally:
        await db.close()
