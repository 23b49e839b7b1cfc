"""The row types of an archive: what every source yields and every tool reads (imports nothing of the package)."""

from __future__ import annotations

from dataclasses import dataclass, field

DICOM_FIELDS = {  # index column -> DICOM keyword (strings as the file holds them; None for other images)
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "study_date": "StudyDate",
    "series_description": "SeriesDescription",
}


@dataclass
class ArchiveRow:
    """One image of the archive: `image` is anything the MedMoE image processor reads (a path, bytes, a PIL image,
    a DICOM dataset), or a callable that fetches it (a PACS instance); `path` is set when the image is a file that
    can be shown again later. `problem` names why an entry cannot be read at all (it is skipped, counted and
    listed, never opened), `detail` says more."""

    id: str
    image: object
    path: str | None = None
    metadata: dict = field(default_factory=dict)
    problem: str | None = None
    detail: str = ""
