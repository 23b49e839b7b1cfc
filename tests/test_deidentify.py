"""The output policies of the archive tools: what --deidentify writes of each column, skip entry and source, and the
key's handling."""

import argparse
import os

import pytest

from medmoe_archive.deidentify import (
    DROPPED,
    KEPT,
    PSEUDONYM,
    DeidentifiedOutput,
    IdentifiedOutput,
    add_deidentify_arguments,
    output_policy,
    private_files,
    strip_credentials,
)

KEY = b"a secret of the hospital's, 32 bytes"


def policy_from(argv):
    parser = argparse.ArgumentParser()
    add_deidentify_arguments(parser)
    return output_policy(parser.parse_args(argv))


def test_the_basic_profile_decides_each_column():
    policy = DeidentifiedOutput(KEY)
    assert {column: policy.treatment(column) for column in ("id", "folder", "patient_id", "study_uid", "series_uid",
            "sop_instance_uid", "study_date")} == dict.fromkeys(("id", "folder", "patient_id", "study_uid",
            "series_uid", "sop_instance_uid", "study_date"), PSEUDONYM)  # fmt: skip
    for column in ("modality", "body_part", "frame", "embedding", "expert", "expert_index"):
        assert policy.treatment(column) == KEPT
    for column in ("path", "thumbnail", "series_description", "text", "patient_name", "mrn"):
        assert policy.treatment(column) == DROPPED
    allowing = DeidentifiedOutput(KEY, keep_descriptions=True, keep_columns=["modality_label"])
    assert allowing.treatment("series_description") == allowing.treatment("modality_label") == KEPT
    assert IdentifiedOutput().treatment("patient_name") == KEPT


def test_a_row_keeps_only_pseudonyms_and_allowed_values():
    policy = DeidentifiedOutput(KEY)
    row = {"id": "SMITH/1.dcm", "path": "/archive/SMITH/1.dcm", "patient_id": "MRN1", "study_date": None,
           "modality": "CT", "series_description": "DOE JANE", "mrn": "MRN1", "thumbnail": b"png"}  # fmt: skip
    written = policy.row(row)
    assert set(written) == {"id", "patient_id", "study_date", "modality"}
    assert written["study_date"] is None and written["modality"] == "CT"
    assert written["patient_id"] == policy.pseudonym("patient_id", "MRN1") != policy.pseudonym("id", "MRN1")
    assert written["patient_id"].startswith("anon-") and "MRN1" not in str(written)
    again = DeidentifiedOutput(KEY).row(row)
    assert again == written and DeidentifiedOutput(b"another key of 16+ bytes").row(row) != written


def test_skip_entries_and_the_source_hold_no_identifier():
    policy = DeidentifiedOutput(KEY)
    entry = {"id": "SMITH/1.dcm", "path": "/archive/SMITH/1.dcm", "reason": "undecodable_dicom",
             "detail": "Cannot decode /archive/SMITH/1.dcm"}  # fmt: skip
    assert policy.skipped(entry) == {"id": policy.pseudonym("id", "SMITH/1.dcm"), "reason": "undecodable_dicom"}
    source = policy.source({"images": "/archive/SMITH_JOHN", "files": None})
    assert "SMITH" not in str(source) and source == policy.source({"images": "/archive/SMITH_JOHN", "files": None})
    assert source != policy.source({"images": "/archive/OTHER", "files": None})
    described = IdentifiedOutput().source({"dicomweb": "https://user:pw@pacs:8443/dicom-web", "qido": []})
    assert described["dicomweb"] == "https://pacs:8443/dicom-web"
    assert strip_credentials("https://pacs/dicom-web") == "https://pacs/dicom-web"


def test_the_key_is_checked_and_never_shown(tmp_path, caplog, monkeypatch):
    with pytest.raises(ValueError, match="at least 16 bytes"):
        DeidentifiedOutput(b"short")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    os.chmod(key_file, 0o644)
    policy = policy_from(["--deidentify", "--deidentify_key_file", str(key_file)])
    assert "is readable by group or others (mode 0644); chmod 600 it" in caplog.text
    caplog.clear()
    fingerprint = DeidentifiedOutput(KEY).key_fingerprint
    assert policy.key_fingerprint == fingerprint != DeidentifiedOutput(KEY[::-1]).key_fingerprint
    assert KEY.decode() not in repr(policy)
    os.chmod(key_file, 0o600)
    policy_from(["--deidentify", "--deidentify_key_file", str(key_file)])
    assert caplog.text == ""
    monkeypatch.delenv("MEDMOE_DEIDENTIFY_KEY", raising=False)
    with pytest.raises(ValueError, match="needs a secret key"):
        policy_from(["--deidentify"])
    with pytest.raises(ValueError, match="add --deidentify"):
        policy_from(["--keep_descriptions"])
    assert isinstance(policy_from([]), IdentifiedOutput) and not policy_from([]).deidentified


def test_holdings_come_from_what_was_written():
    policy = DeidentifiedOutput(KEY)
    holds = policy.holdings(["id", "patient_id", "modality", "embedding"], {"path": False, "thumbnail": False})
    assert holds["columns"] == {"id": PSEUDONYM, "patient_id": PSEUDONYM, "modality": KEPT, "embedding": KEPT}
    assert holds["deidentified"] and not holds["file_paths"] and holds["key_fingerprint"] == policy.key_fingerprint
    plain = IdentifiedOutput().holdings(["id", "path", "thumbnail"], {"path": True, "thumbnail": False})
    assert plain["file_paths"] and not plain["thumbnails"] and "key_fingerprint" not in plain


def test_private_files_are_readable_by_the_user_alone(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir(mode=0o755)
    (folder / "old.json").write_text("{}")
    os.chmod(folder / "old.json", 0o644)
    with private_files(folder):
        (folder / "sub").mkdir()
        (folder / "sub" / "new.txt").write_text("x")
    modes = {path.name: path.stat().st_mode & 0o777 for path in [folder, *folder.rglob("*")]}
    assert modes == {"out": 0o700, "old.json": 0o600, "sub": 0o700, "new.txt": 0o600}
