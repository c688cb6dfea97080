"""Fast tests of the pure modules: pseudonyms, page tokens, credentials, settings, errors."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service import errors, memo, settings, timestamps
from service.access import credentials
from service.api import validation
from service.app import check_transport_security
from service.disclosure import pagination
from service.disclosure.pseudonyms import Pseudonyms, looks_like_appointment_id

SECRET = b"k" * 32
#: An internal token the settings accept: long, and of many different characters.
STRONG_TOKEN = "Zq4vT9-kLm2xR7_pWn8sYc3bHj6dGf5a"


class TestPseudonyms:
    @given(st.uuids())
    @hypothesis_settings(max_examples=200)
    def test_appointment_ids_round_trip_for_their_partner(self, internal: uuid.UUID) -> None:
        codec = Pseudonyms(SECRET).for_partner(uuid.UUID(int=1))
        public = codec.appointment_id(internal)
        assert looks_like_appointment_id(public)
        assert codec.parse_appointment_id(public) == internal

    def test_partners_get_unrelated_ids_and_refs(self) -> None:
        pseudonyms = Pseudonyms(SECRET)
        a, b = pseudonyms.for_partner(uuid.UUID(int=1)), pseudonyms.for_partner(uuid.UUID(int=2))
        internal = uuid.uuid4()
        assert a.appointment_id(internal) != b.appointment_id(internal)
        assert a.patient_ref(internal) != b.patient_ref(internal)
        assert b.parse_appointment_id(a.appointment_id(internal)) != internal

    def test_another_server_secret_gives_other_ids(self) -> None:
        internal, partner = uuid.uuid4(), uuid.uuid4()
        first = Pseudonyms(SECRET).for_partner(partner).appointment_id(internal)
        second = Pseudonyms(b"j" * 32).for_partner(partner).appointment_id(internal)
        assert first != second

    def test_ids_do_not_contain_the_internal_id(self) -> None:
        internal = uuid.uuid4()
        public = Pseudonyms(SECRET).for_partner(uuid.uuid4()).appointment_id(internal)
        assert internal.hex not in public and str(internal) not in public

    @pytest.mark.parametrize(
        "text",
        [
            "", "apt_", "apt_" + "a" * 25, "apt_" + "A" * 26, "pat_" + "a" * 26, "apt_" + "1" * 26,
            "apt_" + "a" * 26 + "\n", "apt_" + "a" * 26 + " ", "\napt_" + "a" * 26, "apt_" + "a" * 25 + "\x00",
        ],
    )  # fmt: skip
    def test_malformed_ids_are_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="not an appointment id"):
            Pseudonyms(SECRET).for_partner(uuid.uuid4()).parse_appointment_id(text)

    @given(st.uuids(), st.integers(1, 3))
    @hypothesis_settings(max_examples=100)
    def test_an_id_has_one_spelling(self, internal: uuid.UUID, spare: int) -> None:
        # The last base32 character carries 2 bits past the 128: only the spelling with them zero is an id.
        codec = Pseudonyms(SECRET).for_partner(uuid.UUID(int=1))
        public = codec.appointment_id(internal)
        alphabet = "abcdefghijklmnopqrstuvwxyz234567"
        other = public[:-1] + alphabet[alphabet.index(public[-1]) | spare]
        assert base64.b32decode(other[4:].upper() + "======") == base64.b32decode(public[4:].upper() + "======")
        assert not looks_like_appointment_id(other)
        with pytest.raises(ValueError, match="not an appointment id"):
            codec.parse_appointment_id(other)

    @given(st.uuids())
    @hypothesis_settings(max_examples=100)
    def test_consent_refs_round_trip_for_their_partner_only(self, consent: uuid.UUID) -> None:
        pseudonyms = Pseudonyms(SECRET)
        mine, theirs = pseudonyms.for_partner(uuid.UUID(int=1)), pseudonyms.for_partner(uuid.UUID(int=2))
        reference = mine.consent_ref(consent)
        assert reference.startswith("cns_") and consent.hex not in reference and str(consent) not in reference
        assert mine.parse_consent_ref(reference) == consent
        assert theirs.consent_ref(consent) != reference and theirs.parse_consent_ref(reference) != consent
        assert mine.consent_ref(consent) != mine.appointment_id(consent)  # a key of its own

    def test_remembered_ids_are_the_ids_derived_anew_and_the_memory_stays_bounded(self) -> None:
        partners = [uuid.uuid4() for _ in range(3)]
        internals = [uuid.uuid4() for _ in range(40)]
        remembering = Pseudonyms(SECRET, memo_size=16)
        fresh = Pseudonyms(SECRET, memo_size=0)

        for _ in range(2):  # the second round answers partly from memory
            for partner in partners:
                for internal in internals:
                    codec, check = remembering.for_partner(partner), fresh.for_partner(partner)
                    assert codec.appointment_id(internal) == check.appointment_id(internal)
                    assert codec.patient_ref(internal) == check.patient_ref(internal)

        derived = remembering._derived
        assert 0 < len(derived.appointments) <= 16 and 0 < len(derived.patients) <= 16
        assert not fresh._derived.appointments and not fresh._derived.patients

    def test_a_short_secret_is_refused(self) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            Pseudonyms(b"short")


class TestPageTokens:
    def test_a_token_opens_only_with_its_binding(self) -> None:
        tokens = pagination.PageTokens(os.urandom(32))
        token = tokens.seal(b"cursor", b"partner-a|query-1")
        assert tokens.open(token, b"partner-a|query-1") == b"cursor"
        for binding in (b"partner-b|query-1", b"partner-a|query-2"):
            with pytest.raises(errors.InvalidArgument):
                tokens.open(token, binding)

    def test_tokens_from_another_key_are_refused(self) -> None:
        token = pagination.PageTokens(os.urandom(32)).seal(b"cursor", b"b")
        with pytest.raises(errors.InvalidArgument):
            pagination.PageTokens(os.urandom(32)).open(token, b"b")

    @given(st.text(max_size=600))
    @hypothesis_settings(max_examples=300)
    def test_arbitrary_text_is_invalid_argument_never_a_crash(self, text: str) -> None:
        with pytest.raises(errors.InvalidArgument):
            pagination.PageTokens(b"p" * 32).open(text, b"b")

    def test_the_cursor_is_not_readable_in_the_token(self) -> None:
        row = uuid.uuid4()
        now = timestamps.to_micros(datetime.now(UTC))
        token = pagination.PageTokens(os.urandom(32)).seal(pagination.pack_time_cursor(now, row), b"b")
        assert row.hex not in token and row.bytes.hex() not in token

    @given(
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)), st.uuids()
    )
    def test_time_cursors_round_trip(self, when: datetime, row: uuid.UUID) -> None:
        micros = timestamps.to_micros(when)
        assert pagination.unpack_time_cursor(pagination.pack_time_cursor(micros, row)) == (micros, row)

    @pytest.mark.parametrize(("value", "expected"), [(0, 50), (1, 1), (500, 500)])
    def test_page_sizes(self, value: int, expected: int) -> None:
        problems: list[errors.FieldViolation] = []
        assert validation.page_size(value, problems, default=50, maximum=500) == expected
        assert problems == []

    @pytest.mark.parametrize("value", [-1, 501, 2**31 - 1])
    def test_bad_page_sizes(self, value: int) -> None:
        problems: list[errors.FieldViolation] = []
        validation.page_size(value, problems, default=50, maximum=500)
        assert [p.field for p in problems] == ["page_size"]


class TestCredentials:
    def test_an_issued_key_names_its_id_and_hashes_to_what_is_stored(self) -> None:
        key = credentials.new_partner_key()
        assert credentials.partner_key_id(key.secret) == key.key_id
        assert credentials.is_key_id(key.key_id)
        assert credentials.hash_secret(key.secret) == key.secret_hash

    @pytest.mark.parametrize("suffix", ["\n", " ", "\x00", "x"])
    def test_a_key_with_anything_after_it_is_not_a_key(self, suffix: str) -> None:
        key = credentials.new_partner_key()
        with pytest.raises(errors.Unauthenticated):
            credentials.partner_key_id(key.secret + suffix)
        assert not credentials.is_key_id(key.key_id + suffix)

    def test_the_stored_hash_is_not_the_secret(self) -> None:
        key = credentials.new_partner_key()
        assert key.secret.encode() not in key.secret_hash
        assert len(key.secret_hash) == 32

    @pytest.mark.parametrize(
        "metadata", [None, [], [("authorization", "Basic x")], [("authorization", "Bearer ")], [("x-api-key", "k")]]
    )
    def test_missing_bearer_is_credentials_missing(self, metadata: list[tuple[str, str]] | None) -> None:
        with pytest.raises(errors.Unauthenticated) as caught:
            credentials.bearer_token(metadata)
        assert caught.value.reason == "CREDENTIALS_MISSING"

    def test_the_internal_token_is_checked(self) -> None:
        token = credentials.InternalToken("t" * 40)
        token.verify([("authorization", "Bearer " + "t" * 40)])
        with pytest.raises(errors.Unauthenticated):
            token.verify([("authorization", "Bearer " + "t" * 39)])


class TestSettings:
    def test_defaults(self) -> None:
        loaded = settings.load({})
        assert loaded.partner_addr == "[::]:50051"
        assert loaded.internal_addr == "127.0.0.1:50052"
        assert loaded.data_dir == Path(".apptgate")
        assert loaded.database_url is None

    def test_every_problem_is_reported_at_once(self) -> None:
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_DB_POOL_MIN": "x", "APPTGATE_ALLOW_INSECURE": "maybe"})
        assert len(caught.value.problems) == 2

    def test_values_wrong_together_are_reported_with_those_wrong_alone(self) -> None:
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_WORKERS": "abc", "APPTGATE_DB_POOL_MIN": "9", "APPTGATE_DB_POOL_MAX": "3"})
        assert caught.value.problems == [
            "APPTGATE_WORKERS: expected a whole number, got 'abc'",
            "APPTGATE_DB_POOL_MIN: must not exceed APPTGATE_DB_POOL_MAX",
        ]

    def test_the_event_loop_is_uvloop_unless_asked_otherwise(self) -> None:
        assert settings.load({}).event_loop == "uvloop"
        assert settings.load({"APPTGATE_EVENT_LOOP": " Asyncio "}).event_loop == "asyncio"
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_EVENT_LOOP": "trio"})
        assert caught.value.problems == ["APPTGATE_EVENT_LOOP: expected one of uvloop, asyncio, got 'trio'"]

    def test_the_view_memo_is_sized_by_the_environment(self) -> None:
        assert settings.load({}).view_memo == 16_384
        assert settings.load({"APPTGATE_VIEW_MEMO": "0"}).view_memo == 0
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_VIEW_MEMO": "-1"})
        assert caught.value.problems == ["APPTGATE_VIEW_MEMO: must be at least 0"]

    def test_flags_override_the_environment(self) -> None:
        loaded = settings.load({"APPTGATE_PARTNER_ADDR": "127.0.0.1:1"}, {"partner_addr": "127.0.0.1:2"})
        assert loaded.partner_addr == "127.0.0.1:2"

    def test_secrets_are_not_in_the_repr(self) -> None:
        loaded = settings.load({"APPTGATE_INTERNAL_TOKEN": STRONG_TOKEN, "APPTGATE_SERVER_SECRET": "zz" * 30})
        assert STRONG_TOKEN[:12] not in repr(loaded) and "zzzz" not in repr(loaded)

    def test_no_database_password_is_in_the_repr_from_a_url_or_a_password_file(self, tmp_path: Path) -> None:
        main_file, partner_file = tmp_path / "main.pass", tmp_path / "partner.pass"
        main_file.write_text("Pw-from-FILE-main\n")
        partner_file.write_text("Pw-from-FILE-partner\n")
        token_file = tmp_path / "token"
        token_file.write_text(STRONG_TOKEN + "\n")
        from_urls = settings.load(
            {
                "DATABASE_URL": "postgresql://owner:Pw-in-URL-main@db.example:5432/app",
                "APPTGATE_PARTNER_DATABASE_URL": "postgresql://apptgate_partner:Pw-in-URL-partner@db.example/app",
            }
        )
        from_files = settings.load(
            {
                "DATABASE_URL": "postgresql://owner@db.example:5432/app",
                "APPTGATE_DATABASE_PASSWORD_FILE": str(main_file),
                "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE": str(partner_file),
                "APPTGATE_INTERNAL_TOKEN_FILE": str(token_file),
            }
        )

        shown = repr(from_urls) + repr(from_files) + str(from_files)
        assert "Pw-" not in shown and STRONG_TOKEN[:12] not in shown
        # The check can fail: the values are there, only not shown.
        assert from_files.database_url == "postgresql://owner:Pw-from-FILE-main@db.example:5432/app"
        assert from_files.internal_token == STRONG_TOKEN
        assert str(main_file) in shown  # a path is not a secret

    @pytest.mark.parametrize(
        ("token", "complaint"),
        [
            ("a" * 64, "at least 8 different characters"),
            (" " * 40, "white space"),
            ("ab" * 20, "at least 8 different characters"),
            (STRONG_TOKEN[:20] + " " + STRONG_TOKEN[20:], "white space"),
            (STRONG_TOKEN[:31], "at least 32 characters"),
            (STRONG_TOKEN[:30] + "é" * 4, "printable ASCII"),
        ],
    )
    def test_a_short_or_trivially_weak_internal_token_is_refused(self, token: str, complaint: str) -> None:
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_INTERNAL_TOKEN": token})
        [problem] = caught.value.problems
        assert problem.startswith("APPTGATE_INTERNAL_TOKEN: ") and complaint in problem
        assert token.strip() not in problem or not token.strip()

    def test_the_internal_token_file_is_read_trimmed_checked_and_loses_to_the_variable(self, tmp_path: Path) -> None:
        path = tmp_path / "token"
        path.write_text(f"  {STRONG_TOKEN}\n")
        assert settings.load({"APPTGATE_INTERNAL_TOKEN_FILE": str(path)}).internal_token == STRONG_TOKEN
        other = STRONG_TOKEN[::-1]
        both = {"APPTGATE_INTERNAL_TOKEN_FILE": str(path), "APPTGATE_INTERNAL_TOKEN": other}
        assert settings.load(both).internal_token == other
        path.write_text("x" * 40 + "\n")
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"APPTGATE_INTERNAL_TOKEN_FILE": str(path)})
        assert caught.value.problems == [
            f"APPTGATE_INTERNAL_TOKEN_FILE: the token in {path} is too weak: it must mix at least 8 different "
            "characters (generate one with `openssl rand -base64 32`)"
        ]

    def test_a_password_file_replaces_the_urls_password_and_is_url_quoted(self, tmp_path: Path) -> None:
        path = tmp_path / "pass"
        path.write_text("p@ss:w/rd%\n")
        loaded = settings.load(
            {
                "DATABASE_URL": "postgresql://owner:old@db.example:5432/app?sslmode=require",
                "APPTGATE_DATABASE_PASSWORD_FILE": str(path),
                "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE": str(path),
            }
        )
        assert loaded.database_url == "postgresql://owner:p%40ss%3Aw%2Frd%25@db.example:5432/app?sslmode=require"
        # Without APPTGATE_PARTNER_DATABASE_URL, the partner login is derived from DATABASE_URL, with its password.
        assert loaded.partner_database_url == (
            "postgresql://apptgate_partner:p%40ss%3Aw%2Frd%25@db.example:5432/app?sslmode=require"
        )

    @pytest.mark.parametrize(
        ("environ", "problem"),
        [
            ({}, "APPTGATE_DATABASE_PASSWORD_FILE: needs DATABASE_URL (the embedded database takes none)"),
            (
                {"DATABASE_URL": "postgresql://owner@db/app?password=inline"},
                "DATABASE_URL: the URL holds a password parameter; with a password file, remove it",
            ),
            ({"DATABASE_URL": "mysql://owner@db/app"}, "DATABASE_URL: a password file needs a postgresql:// URL"),
        ],
    )
    def test_a_password_file_that_cannot_apply_is_refused_without_echoing_the_url(
        self, tmp_path: Path, environ: dict[str, str], problem: str
    ) -> None:
        path = tmp_path / "pass"
        path.write_text("secret-password\n")
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({**environ, "APPTGATE_DATABASE_PASSWORD_FILE": str(path)})
        assert caught.value.problems == [problem]

    def test_an_empty_password_file_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "pass"
        path.write_text("\n")
        with pytest.raises(errors.ConfigError) as caught:
            settings.load({"DATABASE_URL": "postgresql://owner@db/app", "APPTGATE_DATABASE_PASSWORD_FILE": str(path)})
        assert caught.value.problems == ["DATABASE_URL: its password file is empty"]

    @pytest.mark.parametrize(
        ("addr", "loopback"),
        [
            ("127.0.0.1:1", True),
            ("[::1]:1", True),
            ("localhost:1", True),
            ("[::]:1", False),
            ("0.0.0.0:1", False),
            ("10.0.0.1:1", False),
        ],
    )
    def test_loopback_detection(self, addr: str, loopback: bool) -> None:
        assert settings.is_loopback(addr) is loopback

    @pytest.mark.parametrize(
        ("environ", "refused"),
        [
            ({"APPTGATE_PARTNER_ADDR": "0.0.0.0:1"}, ["partner"]),
            ({"APPTGATE_PARTNER_ADDR": "0.0.0.0:1", "APPTGATE_ALLOW_INSECURE": "true"}, []),
            ({"APPTGATE_INTERNAL_ADDR": "0.0.0.0:1", "APPTGATE_ALLOW_INSECURE": "true"}, ["internal"]),
            ({"APPTGATE_INTERNAL_ADDR": "0.0.0.0:1", "APPTGATE_ALLOW_INSECURE_INTERNAL": "true"}, []),
            (  # production never serves partners in plaintext off loopback, whatever the flags
                {"APPTGATE_ENV": "production", "APPTGATE_PARTNER_ADDR": "0.0.0.0:1", "APPTGATE_ALLOW_INSECURE": "true"},
                ["partner"],
            ),
            (
                {"APPTGATE_ENV": "production", "APPTGATE_INTERNAL_ADDR": "0.0.0.0:1",
                 "APPTGATE_ALLOW_INSECURE_INTERNAL": "true"},
                [],
            ),
        ],
    )  # fmt: skip
    def test_each_listener_is_allowed_plaintext_off_loopback_by_its_own_flag(
        self, environ: dict[str, str], refused: list[str]
    ) -> None:
        loaded = settings.load(
            {
                "APPTGATE_PARTNER_ADDR": "127.0.0.1:1",
                "APPTGATE_INTERNAL_TOKEN": STRONG_TOKEN,
                "DATABASE_URL": "postgresql://owner@db.example/app",
                **environ,
            }
        )
        try:
            check_transport_security(loaded)
            problems: list[str] = []
        except errors.ConfigError as caught:
            problems = caught.problems
        listeners = [p.split(": the ")[1].split(" listener ")[0] for p in problems if " listener " in p]
        assert listeners == refused


class TestErrors:
    def test_invalid_argument_carries_error_info_and_bad_request(self) -> None:
        status = errors.InvalidArgument.field("page_size", "must not be negative").to_status()
        assert status.code == code_pb2.INVALID_ARGUMENT
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
        assert info.domain == errors.DOMAIN and info.reason == "INVALID_ARGUMENT"
        assert bad.field_violations[0].field == "page_size"

    def test_unavailable_carries_retry_info(self) -> None:
        status = errors.Unavailable("down", retry_delay=1.5).to_status()
        retry = error_details_pb2.RetryInfo()
        assert status.details[1].Unpack(retry)
        assert retry.retry_delay.ToTimedelta() == timedelta(seconds=1.5)


def test_timestamps_convert_exactly() -> None:
    when = datetime(2030, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    stamp = timestamps.to_timestamp(when)
    assert stamp.ToDatetime(tzinfo=UTC) == when
    problems: list[errors.FieldViolation] = []
    assert timestamps.from_timestamp(stamp, "start_time", problems) == when
    stamp.seconds = 2**62
    assert timestamps.from_timestamp(stamp, "start_time", problems) is None
    assert problems[0].field == "start_time"


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_times_in_microseconds_convert_exactly(when: datetime) -> None:
    micros = timestamps.to_micros(when)
    stamp = Timestamp()
    timestamps.set_timestamp_micros(stamp, micros)

    expected = Timestamp()
    expected.FromDatetime(when)
    assert timestamps.from_micros(micros) == when
    assert stamp == expected == timestamps.to_timestamp(when)  # the same seconds and nanos, before 1970 too


def test_a_memo_holds_at_most_its_size_and_is_emptied_at_once_when_full() -> None:
    table: dict[str, int] = {}
    for n in range(3):
        assert memo.remember(table, f"k{n}", n, 3) == n
    assert table == {"k0": 0, "k1": 1, "k2": 2}

    assert memo.remember(table, "k3", 3, 3) == 3

    assert table == {"k3": 3}

    nothing: dict[str, int] = {}
    assert memo.remember(nothing, "k", 1, 0) == 1
    assert nothing == {}


def test_the_configuration_reference_is_the_one_the_declarations_give() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    _, _, generated = doc.partition("from service/settings.py: edit the declarations, not this table -->\n")
    table, _, _ = generated.partition("<!-- END generated -->")

    assert table == settings.reference(), "docs/configuration.md is out of date: run `python tools/configdoc.py`"
    assert all(f"`{variable.name}`" in table for variable in settings.variables())
