"""Patient data in an archive index: keyed-hash pseudonyms in place of identifiers, before anything is written.

With `medmoe-index --deidentify`, every identifying column of a row (its id and folder, which are file paths, and the
DICOM patient id, study, series and instance UIDs and study date) is replaced by HMAC-SHA256(key, value), shortened
to 20 hex digits; the file path is not stored and neither are thumbnails (pixels can carry burned-in text). The key is
the user's secret (a file, or the MEDMOE_DEIDENTIFY_KEY environment variable): the same patient, study or series gets
the same pseudonym in every run with the same key, so studies and series still group, while without the key a
pseudonym cannot be traced back. The modality, body part and series description stay (they say what an image shows).

It is off by default: an index built inside the archive's own trust boundary serves its users best with the real
UIDs (a hit opens in the PACS viewer) and paths; an index that leaves that boundary should be built with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_VARIABLE = "MEDMOE_DEIDENTIFY_KEY"
MINIMUM_KEY_BYTES = 16
PSEUDONYMISED = ("id", "folder", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "study_date")
DROPPED = ("path", "thumbnail")


class Pseudonymizer:
    """Replaces a row's identifying columns by keyed-hash pseudonyms and drops its path and thumbnail."""

    def __init__(self, key: bytes):
        if len(key) < MINIMUM_KEY_BYTES:
            raise ValueError(f"The de-identification key must hold at least {MINIMUM_KEY_BYTES} bytes.")
        self.key = key

    @classmethod
    def from_key_file_or_environment(cls, key_file: Path | None) -> "Pseudonymizer":
        """The key from `key_file`, else from the MEDMOE_DEIDENTIFY_KEY variable; a clear error when neither is set."""
        if key_file is not None:
            return cls(Path(key_file).read_bytes().strip())
        if os.environ.get(KEY_VARIABLE):
            return cls(os.environ[KEY_VARIABLE].encode())
        raise ValueError(
            f"--deidentify needs a secret key: --deidentify_key_file FILE or the {KEY_VARIABLE} variable "
            f"(at least {MINIMUM_KEY_BYTES} bytes; keep it to map the same patients to the same pseudonyms later)."
        )

    def pseudonym(self, value: str) -> str:
        return "anon-" + hmac.new(self.key, value.encode(), hashlib.sha256).hexdigest()[:20]

    def row(self, row: dict) -> dict:
        """The row with its identifiers pseudonymised (None stays None) and its path and thumbnail dropped."""
        cleaned = dict(row)
        for column in PSEUDONYMISED:
            if cleaned.get(column) is not None:
                cleaned[column] = self.pseudonym(str(cleaned[column]))
        for column in DROPPED:
            if column in cleaned:
                cleaned[column] = None
        return cleaned


def index_holdings(pseudonymizer: Pseudonymizer | None, thumbnail_size: int) -> dict:
    """What an index holds of patients, for index_info.json."""
    if pseudonymizer is not None:
        return {
            "identifiers": "keyed-hash pseudonyms (HMAC-SHA256): id, folder, patient_id, study_uid, series_uid, "
            "sop_instance_uid, study_date",
            "file_paths": False,
            "thumbnails": False,
        }
    return {
        "identifiers": "as in the source: file paths, and for DICOM the patient id, study, series and instance UIDs "
        "and study date",
        "file_paths": True,
        "thumbnails": thumbnail_size > 0,
    }
