"""Encryption at rest (service.sealing): format, binding to the row and column, key ids, rotation, configuration."""

from __future__ import annotations

import base64
import os
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service import models
from service.crypto import sealing
from service.crypto.keyfiles import load_data_keys
from service.crypto.sealing import DataKeyring, SealError
from service.errors import ConfigError
from service.settings import Settings

K1, K2 = b"\x01" * 32, b"\x02" * 32
ROW = uuid.UUID("6f1c2a9e-5d1b-4c7a-9e0f-1a2b3c4d5e6f")
PLACE = {"table": "patients", "column": "phone", "row_id": ROW}
SECRET_TEXT = "+33699990001"


def _text(key_id: int, key: bytes) -> str:
    return f"{key_id}:{base64.b64encode(key).decode()}"


class TestSealAndOpen:
    @given(st.text(max_size=300))
    @hypothesis_settings(max_examples=200)
    def test_any_text_round_trips(self, text: str) -> None:
        keys = DataKeyring([(1, K1)])
        assert keys.open(keys.seal(text, **PLACE), **PLACE) == text

    def test_the_format_is_version_key_id_nonce_ciphertext_and_tag(self) -> None:
        blob = DataKeyring([(513, K1)]).seal(SECRET_TEXT, **PLACE)

        assert blob[0] == sealing.VERSION
        assert blob[1:3] == (513).to_bytes(2, "big")
        assert len(blob) == 3 + 12 + len(SECRET_TEXT.encode()) + 16
        assert sealing.key_id_of(blob) == 513
        assert SECRET_TEXT.encode() not in blob

    def test_sealing_twice_gives_different_bytes(self) -> None:
        keys = DataKeyring([(1, K1)])
        assert keys.seal(SECRET_TEXT, **PLACE) != keys.seal(SECRET_TEXT, **PLACE)

    @pytest.mark.parametrize(
        "moved",
        [
            {"table": "patients", "column": "email", "row_id": ROW},
            {"table": "appointments", "column": "phone", "row_id": ROW},
            {"table": "patients", "column": "phone", "row_id": uuid.uuid4()},
        ],
        ids=["another column", "another table", "another row"],
    )
    def test_a_value_moved_elsewhere_does_not_open(self, moved: dict[str, object]) -> None:
        keys = DataKeyring([(1, K1)])
        blob = keys.seal(SECRET_TEXT, **PLACE)

        with pytest.raises(SealError, match="does not open") as caught:
            keys.open(blob, **moved)  # type: ignore[arg-type]
        assert SECRET_TEXT not in str(caught.value)

    def test_an_unknown_key_id_is_named_without_content(self) -> None:
        blob = DataKeyring([(7, K1)]).seal(SECRET_TEXT, **PLACE)

        with pytest.raises(SealError, match="data key 7, which is not configured") as caught:
            DataKeyring([(1, K1)]).open(blob, **PLACE)
        assert SECRET_TEXT not in str(caught.value)

    def test_the_same_id_with_another_key_does_not_open(self) -> None:
        blob = DataKeyring([(1, K1)]).seal(SECRET_TEXT, **PLACE)
        with pytest.raises(SealError, match="does not open"):
            DataKeyring([(1, K2)]).open(blob, **PLACE)

    @pytest.mark.parametrize("position", [0, 1, 2, 3, 14, 15, -1])
    def test_any_flipped_byte_is_refused(self, position: int) -> None:
        keys = DataKeyring([(1, K1)])
        blob = bytearray(keys.seal(SECRET_TEXT, **PLACE))
        blob[position] ^= 0x01

        with pytest.raises(SealError) as caught:
            keys.open(bytes(blob), **PLACE)
        assert SECRET_TEXT not in str(caught.value)

    @pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01\x00\x01" + b"\x00" * 27, b"\x02" + b"\x00" * 40])
    def test_truncated_or_foreign_bytes_are_refused(self, blob: bytes) -> None:
        with pytest.raises(SealError, match="format"):
            DataKeyring([(1, K1)]).open(blob, **PLACE)
        with pytest.raises(SealError, match="format"):
            sealing.key_id_of(blob)

    def test_the_keyring_repr_shows_ids_only(self) -> None:
        keys = DataKeyring([(2, K2), (1, K1)])
        assert repr(keys) == "DataKeyring(key_ids=(2, 1))"


class TestKeyCheck:
    def test_the_check_value_is_hmac_sha256_of_a_fixed_message_truncated_and_not_the_key(self) -> None:
        import hashlib
        import hmac

        check = sealing.key_check(K1)

        assert check == hmac.new(K1, b"apptgate-data-key-check", hashlib.sha256).digest()[:16]
        assert len(check) == sealing.CHECK_SIZE == 16
        assert K1[:8] not in check and check not in K1

    def test_each_key_of_a_ring_has_its_own_check_value_and_the_same_key_the_same_one(self) -> None:
        ring = DataKeyring([(2, K2), (1, K1)])
        wrong = DataKeyring([(1, os.urandom(32))])

        assert ring.check_value(1) == DataKeyring([(1, K1)]).check_value(1) == sealing.key_check(K1)
        assert ring.check_value(2) != ring.check_value(1)
        assert wrong.check_value(1) != ring.check_value(1)
        with pytest.raises(KeyError):
            ring.check_value(3)

    def test_columns_not_opening_tries_only_the_values_under_the_key_asked(self) -> None:
        ring = DataKeyring([(2, K2), (1, K1)])
        sealed = {
            "phone": DataKeyring([(1, K1)]).seal(SECRET_TEXT, **PLACE),
            "email": DataKeyring([(1, os.urandom(32))]).seal("x@example.invalid", **{**PLACE, "column": "email"}),
            "given_name": ring.seal("G", **{**PLACE, "column": "given_name"}),
            "family_name": None,
        }

        assert sealing.columns_not_opening(ring, "patients", ROW, sealed, 1) == ["email"]
        assert sealing.columns_not_opening(ring, "patients", ROW, sealed, 2) == []
        assert sealing.columns_not_opening(ring, "patients", uuid.uuid4(), sealed, 2) == ["given_name"]


class TestRotation:
    def test_the_first_key_seals_and_every_key_opens(self) -> None:
        old = DataKeyring([(1, K1)]).seal(SECRET_TEXT, **PLACE)
        ring = DataKeyring([(2, K2), (1, K1)])

        fresh = ring.seal(SECRET_TEXT, **PLACE)

        assert ring.active_key_id == 2 and ring.key_ids == (2, 1)
        assert sealing.key_id_of(fresh) == 2
        assert ring.open(old, **PLACE) == ring.open(fresh, **PLACE) == SECRET_TEXT
        assert ring.needs_rotation(old) and not ring.needs_rotation(fresh)

    def test_reseal_moves_a_value_to_the_active_key_and_leaves_current_ones_alone(self) -> None:
        ring = DataKeyring([(2, K2), (1, K1)])
        old = DataKeyring([(1, K1)]).seal(SECRET_TEXT, **PLACE)
        current = ring.seal(SECRET_TEXT, **PLACE)

        moved = sealing.reseal(ring, "patients", "phone", ROW, old, None)

        assert moved is not None and sealing.key_id_of(moved) == 2
        assert DataKeyring([(2, K2)]).open(moved, **PLACE) == SECRET_TEXT
        assert sealing.reseal(ring, "patients", "phone", ROW, current, None) is current
        assert sealing.reseal(ring, "patients", "phone", ROW, None, None) is None

    def test_reseal_seals_clear_text_which_wins_over_a_seal(self) -> None:
        ring = DataKeyring([(1, K1)])
        stale = ring.seal("+33600000000", **PLACE)

        sealed = sealing.reseal(ring, "patients", "phone", ROW, stale, SECRET_TEXT)

        assert sealed is not None and ring.open(sealed, **PLACE) == SECRET_TEXT

    def test_usage_problems_name_old_and_missing_keys_and_clear_values(self) -> None:
        ring = DataKeyring([(2, K2), (1, K1)])
        headers = [sealing.header(1), sealing.header(2), sealing.header(9)]

        problems = sealing.usage_problems(ring, headers, True)

        assert problems == [
            "contact details or visit reasons are still stored in clear",
            "values are sealed under data key(s) 1, 9, not the active key 2",
            "values sealed under data key(s) 9 cannot be opened: the key is not configured",
        ]
        assert sealing.usage_problems(ring, [sealing.header(2)], False) == []

    def test_a_patients_contact_opens_only_for_its_own_row(self) -> None:
        ring = DataKeyring([(1, K1)])
        sealed = sealing.seal_patient_contact(
            ring,
            ROW,
            given_name="Leakcheckgiven",
            family_name="LEAKCHECK",
            sex=2,
            phone=None,
            email="l@example.invalid",
        )
        stored = models.StoredConsentedContact(
            models.ConsentState.LIVE,
            models.ChargeOutcome.OK,
            (1, 2, 4),
            sealed.given_name,
            sealed.family_name,
            sealed.sex,
            None,
            sealed.email,
        )

        opened = sealing.open_consented_contact(ring, ROW, stored)

        assert (opened.given_name, opened.family_name, opened.sex, opened.phone, opened.email) == (
            "Leakcheckgiven",
            "LEAKCHECK",
            2,
            None,
            "l@example.invalid",
        )
        with pytest.raises(SealError):
            sealing.open_consented_contact(ring, uuid.uuid4(), stored)
        with pytest.raises(SealError):  # a sealed sex moved to another column
            sealing.open_consented_contact(ring, ROW, replace(stored, email=sealed.sex))

    def test_every_sealed_sex_has_the_same_length_and_a_clear_one_passes_as_it_is(self) -> None:
        ring = DataKeyring([(1, K1)])
        contacts = [
            sealing.seal_patient_contact(ring, ROW, given_name="G", family_name="F", sex=sex, phone=None, email=None)
            for sex in range(4)
        ]
        stored = models.StoredConsentedContact(models.ConsentState.LIVE, models.ChargeOutcome.OK, (2,), sex=3)

        assert {len(c.sex) for c in contacts} == {len(contacts[0].sex)}
        assert sealing.open_consented_contact(ring, ROW, stored).sex == 3
        with pytest.raises(ValueError, match="one digit"):
            sealing.seal_patient_contact(ring, ROW, given_name="G", family_name="F", sex=10, phone=None, email=None)


class TestConfiguration:
    def test_entries_by_comma_or_line_with_comments_first_active(self) -> None:
        text = f"# rotated 2031-01-01\n{_text(2, K2)}  # new\n\n{_text(1, K1)},"
        ring = DataKeyring.from_text(text)

        assert ring.key_ids == (2, 1)
        assert DataKeyring.from_text(f"{_text(2, K2)},{_text(1, K1)}").key_ids == (2, 1)

    def test_url_safe_and_unpadded_base64_are_accepted(self) -> None:
        key = bytes(range(200, 232))  # encodes with + and / in standard base64
        url_safe = base64.urlsafe_b64encode(key).decode().rstrip("=")
        ring = DataKeyring.from_text(f"1:{url_safe}")

        assert ring.open(DataKeyring([(1, key)]).seal("x", **PLACE), **PLACE) == "x"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "no data key"),
            ("# only a comment", "no data key"),
            ("{key}", "data key 1: expected <key id>:<base64 key>"),
            ("x:{key}", "data key 1: expected <key id>:<base64 key>"),
            ("0:{key}", "data key 1: the key id must be an integer from 1 to 65535"),
            ("65536:{key}", "data key 1: the key id must be an integer from 1 to 65535"),
            ("1:{key},2:not*base64{key}", "data key 2: not base64"),
            ("1:{short}", "data key 1: must be 32 bytes (got 16)"),
            ("1:{key}\n1:{key}", "data key 1: the key id appears twice"),
        ],
    )
    def test_bad_configuration_is_refused_without_echoing_key_text(self, text: str, message: str) -> None:
        key = base64.b64encode(os.urandom(32)).decode()
        short = base64.b64encode(os.urandom(16)).decode()
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as caught:
            DataKeyring.from_text(text.format(key=key, short=short))
        assert key not in str(caught.value) and key[:8] not in str(caught.value)
        assert short[:8] not in str(caught.value)

    def test_the_environment_wins_and_errors_name_the_variable_only(self, tmp_path: Path) -> None:
        key = base64.b64encode(os.urandom(31)).decode()

        with pytest.raises(ConfigError) as caught:
            load_data_keys(Settings(data_dir=tmp_path, data_key=f"1:{key}"))

        assert "APPTGATE_DATA_KEY: data key 1: must be 32 bytes (got 31)" in str(caught.value)
        assert key[:8] not in str(caught.value)
        assert not (tmp_path / "data-keys").exists()

    def test_a_key_file_is_read(self, tmp_path: Path) -> None:
        path = tmp_path / "keys"
        path.write_text(f"{_text(3, K2)}\n{_text(1, K1)}\n")
        assert load_data_keys(Settings(data_dir=tmp_path, data_key_file=path)).key_ids == (3, 1)

    @pytest.mark.parametrize("unsafe", ["mode 0666", "mode 0620", "symbolic link"])
    def test_a_key_file_others_could_write_or_a_link_is_refused_without_its_text(
        self, tmp_path: Path, unsafe: str
    ) -> None:
        text = f"{_text(1, K1)}\n"
        real = tmp_path / "keys"
        real.write_text(text)
        path = real
        if unsafe == "symbolic link":
            path = tmp_path / "link"
            path.symlink_to(real)
        else:
            real.chmod(int(unsafe.removeprefix("mode "), 8))

        with pytest.raises(ConfigError) as caught:
            load_data_keys(Settings(data_dir=tmp_path, data_key_file=path))

        [problem] = caught.value.problems
        expected = (
            f"APPTGATE_DATA_KEY_FILE: {path} is a symbolic link: name the file itself"
            if unsafe == "symbolic link"
            else f"APPTGATE_DATA_KEY_FILE: {path} can be written by other users ({unsafe}): chmod 600 {path}"
        )
        assert problem == expected
        assert text.split(":")[1][:8] not in str(caught.value)

    def test_production_requires_a_configured_key(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="APPTGATE_DATA_KEY or APPTGATE_DATA_KEY_FILE is required"):
            load_data_keys(Settings(env="production", data_dir=tmp_path))
        assert not (tmp_path / "data-keys").exists()

    def test_development_creates_one_private_key_once(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        settings = Settings(data_dir=tmp_path / "data")

        first = load_data_keys(settings)
        second = load_data_keys(settings)

        path = tmp_path / "data" / "data-keys"
        assert first.key_ids == second.key_ids == (1,)
        assert path.stat().st_mode & 0o777 == 0o600
        assert second.open(first.seal("x", **PLACE), **PLACE) == "x"
        warnings = [r for r in caplog.records if "development data key" in r.getMessage()]
        assert len(warnings) == 1
        assert path.read_text().split("\n")[-2].split(":")[1] not in caplog.text
