"""Report-type labeller: reads a report and says which imaging modality it describes.

The modality named earliest in the text wins ("Chest radiograph; compare with prior CT" is an X-ray report).
A report that names no modality is unknown (`UNKNOWN_REPORT_TYPE`), and unknown types are masked out of the
routing losses, so a corpus whose captions rarely name the modality still trains.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

UNKNOWN_REPORT_TYPE = -100

_IGNORE_CASE = re.IGNORECASE
# Each modality: patterns that name it. Acronyms are case-sensitive so that "ct" inside words, "Mr." or "us" do
# not count; spelled-out words are case-insensitive.
MODALITY_PATTERNS: dict[str, list[re.Pattern]] = {
    "X-ray": [
        re.compile(r"\bx[\s-]?rays?\b", _IGNORE_CASE),
        re.compile(r"\bradiograph", _IGNORE_CASE),
        re.compile(r"\bradiogram", _IGNORE_CASE),
        re.compile(r"\b(?:CXR|KUB|AXR)\b"),
        re.compile(r"\bmammogra", _IGNORE_CASE),
        re.compile(r"\b(?:plain|chest) films?\b", _IGNORE_CASE),
        re.compile(r"\broentgen", _IGNORE_CASE),
    ],
    "CT": [
        re.compile(r"\b(?:HR|CE|NC|MD)?CT[AP]?s?\b"),
        re.compile(r"\bcomputed\s+(?:axial\s+)?tomograph", _IGNORE_CASE),
        re.compile(r"\bCAT scan", _IGNORE_CASE),
    ],
    "MRI": [
        re.compile(r"\b(?:f|c)?MR[AIV]?\b"),
        re.compile(r"\bmagnetic\s+resonance", _IGNORE_CASE),
        re.compile(r"\bT[12]\b|\bT[12][\s-]?weighted", _IGNORE_CASE),
        re.compile(r"\b(?:FLAIR|DWI|STIR|SWI)\b"),
        re.compile(r"\bdiffusion[\s-]weighted", _IGNORE_CASE),
    ],
    "ultrasound": [
        re.compile(r"\bultrason", _IGNORE_CASE),
        re.compile(r"\bultrasound", _IGNORE_CASE),
        re.compile(r"\bsonogra", _IGNORE_CASE),
        re.compile(r"\bechocardiogra", _IGNORE_CASE),
        re.compile(r"\becho\b", _IGNORE_CASE),
        re.compile(r"\bdoppler\b", _IGNORE_CASE),
        re.compile(r"\b(?:hypo|hyper|an|iso)echoic\b", _IGNORE_CASE),
    ],
    "pathology": [
        re.compile(r"\bH\s*&\s*E\b"),
        re.compile(r"\bha?ematoxylin", _IGNORE_CASE),
        re.compile(r"\beosin\b", _IGNORE_CASE),
        re.compile(r"\bhisto(?:log|patholog)", _IGNORE_CASE),
        re.compile(r"\bphotomicrograph|\bmicrograph", _IGNORE_CASE),
        re.compile(r"\bwhole[\s-]slide", _IGNORE_CASE),
        re.compile(r"\bimmunohistochem", _IGNORE_CASE),
    ],
    "fundus": [
        re.compile(r"\bfund(?:us|i)\b", _IGNORE_CASE),
        re.compile(r"\bfundoscop|\bfunduscop|\bophthalmoscop", _IGNORE_CASE),
        re.compile(r"\bretina(?:l)? (?:photo|image|imaging)", _IGNORE_CASE),
        re.compile(r"\bretinograph", _IGNORE_CASE),
    ],
}


def detect_modality(report: str) -> str | None:
    """The modality a report names first, or None when it names none.

    >>> detect_modality("Axial T2-weighted image shows a hyperintense lesion.")
    'MRI'
    """
    earliest_position, earliest_modality = None, None
    for modality, patterns in MODALITY_PATTERNS.items():
        for pattern in patterns:
            match = pattern.search(report)
            if match and (earliest_position is None or match.start() < earliest_position):
                earliest_position, earliest_modality = match.start(), modality
    return earliest_modality


def report_type_index(report: str, type_names: Sequence[str]) -> int:
    """Index of the report's modality in `type_names` (a config's `expert_names`), or `UNKNOWN_REPORT_TYPE`."""
    return type_name_to_index(detect_modality(report), type_names)


def type_name_to_index(name: str | None, type_names: Sequence[str]) -> int:
    """Index of a modality name in `type_names`, matched without case, or `UNKNOWN_REPORT_TYPE`."""
    if name is None:
        return UNKNOWN_REPORT_TYPE
    lowered = [type_name.lower() for type_name in type_names]
    return lowered.index(name.lower()) if name.lower() in lowered else UNKNOWN_REPORT_TYPE
