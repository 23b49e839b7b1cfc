"""A PACS over DICOMweb as an archive source: QIDO-RS walks studies -> series -> instances (in UID order, so that a
rerun meets them in the same order and resumes after the rows already indexed), WADO-RS fetches an instance only
when it is embedded.

    medmoe-index --model outputs/medmoe-nano --dicomweb http://pacs:8042/dicom-web --qido ModalitiesInStudy=CT \
        --qido StudyDate=20250101-20251231 --output_dir outputs/pacs-index

Each row holds the study's PatientID and StudyDate, the series' Modality, BodyPartExamined and SeriesDescription, and
the three UIDs, so a hit opens in the PACS viewer. dicomweb-client (the `pacs` extra) is imported only here.
"""

from __future__ import annotations

from collections.abc import Iterator

from medmoe_archive.archive import DICOM_FIELDS, ArchiveRow

STUDY_FIELDS = ("patient_id", "study_uid", "study_date")
SERIES_FIELDS = ("series_uid", "modality", "body_part", "series_description")


class FetchedInstance:
    """An instance of the PACS, fetched (WADO-RS) when called: a pydicom Dataset."""

    def __init__(self, client, study_uid: str, series_uid: str, sop_instance_uid: str):
        self.client, self.uids = client, (study_uid, series_uid, sop_instance_uid)

    def __call__(self):
        return self.client.retrieve_instance(*self.uids)


def client_for(url: str):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as error:
        raise ImportError('Reading a PACS over DICOMweb needs dicomweb-client: pip install -e ".[pacs]".') from error
    return DICOMwebClient(url=url)


def parse_qido_filters(assignments: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["ModalitiesInStudy=CT", "StudyDate=20250101-20251231"] -> QIDO-RS query parameters."""
    filters = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--qido takes KEY=VALUE (a QIDO-RS study query parameter), got {assignment!r}.")
        filters[key.strip()] = value.strip()
    return filters


def values(item: dict) -> dict:
    """A QIDO-RS result (DICOM JSON) -> {index column: value} for the DICOM fields it holds."""
    import pydicom

    dataset = pydicom.Dataset.from_json(item)
    return {column: str(dataset.get(keyword)) for column, keyword in DICOM_FIELDS.items() if dataset.get(keyword)}


def dicomweb_rows(url: str, filters: dict[str, str]) -> Iterator[ArchiveRow]:
    """Every instance of the studies that match `filters`, in UID order; id = SOPInstanceUID, image fetched lazily,
    metadata = the DICOM fields (folder None, frame: the middle one of NumberOfFrames when the PACS reports it)."""
    client = client_for(url)
    studies = sorted((values(item) for item in client.search_for_studies(search_filters=filters, get_remaining=True)),
                     key=lambda study: study["study_uid"])  # fmt: skip
    for study in studies:
        series_list = sorted(
            (values(item) for item in client.search_for_series(study["study_uid"], get_remaining=True)),
            key=lambda series: series["series_uid"],
        )
        for series in series_list:
            found = client.search_for_instances(study["study_uid"], series["series_uid"], get_remaining=True)
            for instance in sorted(
                (values(item) | {"raw": item} for item in found), key=lambda i: i["sop_instance_uid"]
            ):
                frames = instance["raw"].get("00280008", {}).get("Value", [1])[0]
                metadata = {**dict.fromkeys(DICOM_FIELDS), "folder": None, "frame": int(frames) // 2}
                metadata.update({key: study.get(key) for key in STUDY_FIELDS})
                metadata.update({key: series.get(key) for key in SERIES_FIELDS})
                metadata["sop_instance_uid"] = instance["sop_instance_uid"]
                fetch = FetchedInstance(client, study["study_uid"], series["series_uid"], instance["sop_instance_uid"])
                yield ArchiveRow(instance["sop_instance_uid"], fetch, None, metadata)
