"""What the archive tools write of patient data: one policy for every output (index rows, skip lists, progress and
index_info.json, CSV files, logs), written once here.

Two policies, one interface:

- `IdentifiedOutput` (the default): rows as the source gives them. An index built inside the archive's own trust
  boundary serves its users best with the real UIDs (a hit opens in the PACS viewer) and paths.
- `DeidentifiedOutput` (`--deidentify`): DICOM attributes follow PS3.15 Annex E's Basic Application Level
  Confidentiality Profile. Identifiers (the file path as id and folder, PatientID, the study, series and instance
  UIDs, StudyDate) are replaced by keyed-hash pseudonyms, HMAC-SHA256(key, column + value): the same patient, study or
  series gets the same pseudonym in every run with the same key, so studies and series still group, while without
  the key a pseudonym cannot be traced back, and the same value in two columns (a date and an id) cannot be linked.
  Descriptors (SeriesDescription: free text that often names the patient) are removed unless `keep_descriptions`
  (the profile's Retain Descriptors option); coded values (Modality, BodyPartExamined, the frame number) are kept.
  File paths and thumbnails (pixels can carry burned-in text) are not written. Every other column of a tabular
  source (a report, a name, an MRN) is dropped unless the user names it in `keep_columns`. A skipped entry keeps its
  pseudonym and reason only. pydicom's validation messages, which quote raw tag values, are silenced.

Both write files readable by the user alone (`private_files`). The key is the user's secret (a file, or the
MEDMOE_DEIDENTIFY_KEY environment variable); it is never written, only its fingerprint (an HMAC of a fixed string),
so that a resumed run refuses another key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_VARIABLE = "MEDMOE_DEIDENTIFY_KEY"
MINIMUM_KEY_BYTES = 16
FINGERPRINT_MESSAGE = b"medmoe de-identification key fingerprint"

PSEUDONYMISED = ("id", "folder", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "study_date")
DESCRIPTORS = ("series_description",)  # Annex E: X (removed), C with the Retain Descriptors option
CODED = ("modality", "body_part", "frame")  # Annex E keeps them: what the image shows, not who
DERIVED = ("embedding", "expert", "expert_index")  # computed by the model from the pixels
NOT_WRITTEN = ("path", "thumbnail")  # file paths; pixels can carry burned-in text

KEPT, PSEUDONYM, DROPPED = "kept", "pseudonym", "dropped"


def private_permissions(path: Path) -> None:
    """chmod a file or folder the tools wrote to the user alone (0600, folders 0700)."""
    os.chmod(path, 0o700 if path.is_dir() else 0o600)


@contextlib.contextmanager
def private_files(folder: Path | None = None) -> Iterator[None]:
    """Within the block, every file and folder the process creates is readable by the user alone (umask 077).
    `folder`, the output folder, is created (or tightened) to 0700 first, and everything in it, files an earlier run
    left included, is tightened to 0600 / 0700 at the end."""
    previous = os.umask(0o077)
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            private_permissions(folder)
        yield
    finally:
        os.umask(previous)
        if folder is not None and folder.is_dir():
            for path in folder.rglob("*"):
                if not path.is_symlink():
                    private_permissions(path)


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """A warning when a secret's file can be read by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            f"{what[0].upper()}{what[1:]} {path} is readable by group or others (mode {mode:04o}); chmod 600 it."
        )


def strip_credentials(url: str) -> str:
    """A URL without the user:password@ part (what may be stored and printed of it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class IdentifiedOutput:
    """The default policy: every column as the source gives it (inside the archive's trust boundary)."""

    deidentified = False
    key_fingerprint = None

    def treatment(self, column: str) -> str:
        return KEPT

    def features(self, features: dict) -> dict:
        """The columns written, from the columns a row may have."""
        return {name: feature for name, feature in features.items() if self.treatment(name) != DROPPED}

    def row(self, row: dict) -> dict:
        return row

    def skipped(self, entry: dict) -> dict:
        """A skipped entry as written: {"id", "path", "reason", "detail"}."""
        return entry

    def source(self, description: dict) -> dict:
        """What progress.json and index_info.json record of the source (URL credentials never)."""
        return {key: strip_credentials(value) if key == "dicomweb" and value else value
                for key, value in description.items()}  # fmt: skip

    @contextlib.contextmanager
    def quiet_logs(self) -> Iterator[None]:
        yield

    def holdings(self, columns: Iterable[str], non_empty: dict[str, bool]) -> dict:
        """index_info.json's `holds`, from the columns written and which of them hold any value."""
        return {
            "deidentified": self.deidentified,
            "columns": {column: self.treatment(column) for column in columns},
            "file_paths": bool(non_empty.get("path")),
            "thumbnails": bool(non_empty.get("thumbnail")),
            "identifiers": "pseudonyms" if self.deidentified else "as in the source",
            **({"key_fingerprint": self.key_fingerprint} if self.key_fingerprint else {}),
        }


class DeidentifiedOutput(IdentifiedOutput):
    """`--deidentify`: PS3.15 Annex E's basic profile for the DICOM columns, keyed-hash pseudonyms for identifiers,
    no paths or thumbnails, only the allowed columns of a tabular source (see the module's docstring)."""

    deidentified = True

    def __init__(self, key: bytes, keep_descriptions: bool = False, keep_columns: Iterable[str] = ()):
        if len(key) < MINIMUM_KEY_BYTES:
            raise ValueError(f"The de-identification key must hold at least {MINIMUM_KEY_BYTES} bytes.")
        self._key = key
        self.keep_descriptions = keep_descriptions
        self.keep_columns = frozenset(keep_columns)
        self.key_fingerprint = hmac.new(key, FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_arguments(
        cls, key_file: Path | None, keep_descriptions: bool = False, keep_columns: Iterable[str] = ()
    ) -> "DeidentifiedOutput":
        """The key from `key_file` (warned about when others can read it), else from the MEDMOE_DEIDENTIFY_KEY
        variable; a clear error when neither is set."""
        if key_file is not None:
            key_file = Path(key_file)
            warn_if_readable_by_others(key_file, "the de-identification key file")
            return cls(key_file.read_bytes().strip(), keep_descriptions, keep_columns)
        if os.environ.get(KEY_VARIABLE):
            return cls(os.environ[KEY_VARIABLE].encode(), keep_descriptions, keep_columns)
        raise ValueError(
            f"--deidentify needs a secret key: --deidentify_key_file FILE or the {KEY_VARIABLE} variable "
            f"(at least {MINIMUM_KEY_BYTES} bytes; keep it to map the same patients to the same pseudonyms later)."
        )

    def __repr__(self) -> str:  # never the key
        return f"DeidentifiedOutput(key_fingerprint={self.key_fingerprint!r})"

    def treatment(self, column: str) -> str:
        if column in PSEUDONYMISED:
            return PSEUDONYM
        if column in CODED or column in DERIVED or column in self.keep_columns:
            return KEPT
        if column in DESCRIPTORS and self.keep_descriptions:
            return KEPT
        return DROPPED

    def pseudonym(self, column: str, value) -> str:
        message = f"{column}\x1f{value}".encode()
        return "anon-" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:20]

    def row(self, row: dict) -> dict:
        """The row's written columns: pseudonyms (None stays None), kept values; nothing else."""
        written = {}
        for column, value in row.items():
            treatment = self.treatment(column)
            if treatment == PSEUDONYM:
                written[column] = None if value is None else self.pseudonym(column, value)
            elif treatment == KEPT:
                written[column] = value
        return written

    def skipped(self, entry: dict) -> dict:
        return {"id": self.pseudonym("id", entry["id"]), "reason": entry["reason"]}

    def source(self, description: dict) -> dict:
        """A keyed hash of the source (its folder or URL and filters can name a patient): a resume still knows a
        changed source from the same one."""
        text = json.dumps(super().source(description), sort_keys=True)
        return {"deidentified": True, "source_pseudonym": self.pseudonym("source", text)}

    @contextlib.contextmanager
    def quiet_logs(self) -> Iterator[None]:
        """pydicom's validation messages quote raw tag values (a name, an id), as warnings and as log records: off
        within the block."""
        try:
            from pydicom import config
        except ImportError:
            config = None
        pydicom_logger = logging.getLogger("pydicom")
        previous_mode = config.settings.reading_validation_mode if config else None
        previous_disabled = pydicom_logger.disabled
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            pydicom_logger.disabled = True
            if config:
                config.settings.reading_validation_mode = config.IGNORE
            try:
                yield
            finally:
                pydicom_logger.disabled = previous_disabled
                if config:
                    config.settings.reading_validation_mode = previous_mode


def output_policy(args) -> IdentifiedOutput:
    """The policy the archive tools' de-identification flags ask for (`add_deidentify_arguments`)."""
    if not args.deidentify:
        if args.keep_descriptions or args.keep_columns:
            raise ValueError("--keep_descriptions and --keep_columns choose what --deidentify keeps; add --deidentify.")
        return IdentifiedOutput()
    keep_columns = [column.strip() for column in (args.keep_columns or "").split(",") if column.strip()]
    return DeidentifiedOutput.from_arguments(args.deidentify_key_file, args.keep_descriptions, keep_columns)


def add_deidentify_arguments(parser) -> None:
    """--deidentify and what it keeps, shared by medmoe-index and medmoe-classify."""
    parser.add_argument(
        "--deidentify",
        action="store_true",
        help="write keyed-hash pseudonyms instead of paths, patient ids, UIDs and dates; no thumbnails, no series "
        "descriptions, no other source columns (PS3.15 Annex E basic profile; medmoe_archive/deidentify.py)",
    )
    parser.add_argument(
        "--deidentify_key_file", type=Path, help="the secret key's file (default: the MEDMOE_DEIDENTIFY_KEY variable)"
    )
    parser.add_argument(
        "--keep_descriptions",
        action="store_true",
        help="with --deidentify: keep the DICOM series description (free text: check it holds no names)",
    )
    parser.add_argument(
        "--keep_columns",
        help="with --deidentify: comma-separated columns of a tabular source to keep as they are (all others are "
        "dropped)",
    )
