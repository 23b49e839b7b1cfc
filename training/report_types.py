"""Report-type labeller: reads a report and says which imaging modality it describes.

The rules, in order:
1. Find every phrase that names a modality (`MODALITY_PATTERNS`). Where phrases overlap, the longest wins, so
   "gradient echo" (MRI) hides its "echo" (ultrasound). Phrases that look like a modality word but are not
   (`NOT_A_MODALITY`: "gastric fundus", "T1 vertebra") hide what they overlap.
2. Drop mentions of another study (`OTHER_STUDY_CUE` in the few words before them): "compare with the prior CT",
   "seen on the earlier radiograph", "recommend MRI".
3. One modality left: that is the report type. None left, or two or more (a report describing both a radiograph
   and a CT): unknown (`UNKNOWN_REPORT_TYPE`), which the routing losses mask out, so the labeller abstains rather
   than guesses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from modeling_medmoe.configuration_medmoe import UNKNOWN_REPORT_TYPE

_IGNORE_CASE = re.IGNORECASE
# Acronyms are case-sensitive so that "ct" inside words, "Mr." or "us" do not count; words are case-insensitive.
MODALITY_PATTERNS: dict[str, list[re.Pattern]] = {
    "X-ray": [
        re.compile(r"\bx[\s-]?r?ays?\b", _IGNORE_CASE),  # also "xray" and "Xay" (a dropped "-r" in scraped text)
        re.compile(r"\bradiograph(?:s|y)?\b", _IGNORE_CASE),  # not "radiographic findings", a generic heading
        re.compile(r"\bradiograms?\b", _IGNORE_CASE),
        re.compile(r"\b(?:CXR|KUB|AXR)s?\b"),
        re.compile(r"\bmammogra", _IGNORE_CASE),
        re.compile(r"\b(?:plain|chest) films?\b", _IGNORE_CASE),
        re.compile(r"\broentgen", _IGNORE_CASE),
    ],
    "CT": [
        re.compile(r"\b(?:HR|CE|NC|MD)?CT[AP]?s?\b"),
        re.compile(r"\bcomputed\s+(?:axial\s+)?tomograph", _IGNORE_CASE),
        re.compile(r"\bCAT scan", _IGNORE_CASE),
        re.compile(r"\b(?:hyper|hypo|iso)[\s-]?attenuat", _IGNORE_CASE),
        re.compile(r"\bHounsfield\b|\b\d+\s?HU\b"),
        re.compile(r"\b(?:hyper|hypo|iso)[\s-]?dens(?:e|ity|ities)\b", _IGNORE_CASE),
    ],
    "MRI": [
        re.compile(r"\b(?:f|c)?MR(?:[AIV]|CP|S)?\b"),
        re.compile(r"\bmagnetic\s+resonance", _IGNORE_CASE),
        re.compile(r"\bT[12][\s-]?(?:W|WI|weighted)\b", _IGNORE_CASE),
        # a bare T1/T2 names a sequence only in MRI words' company ("T2 hyperintense", "on T1")
        re.compile(
            r"\bT[12]\b(?=[\s-]+(?:and\s+T[12]\b|weighted|images?\b|imaging|sequences?|signal|hyper|hypo|iso|"
            r"post|pre|fat|FLAIR|STIR|with contrast|gad))",
            _IGNORE_CASE,
        ),
        re.compile(r"(?<=\bon )T[12]\b", _IGNORE_CASE),
        re.compile(r"\b(?:FLAIR|DWI|STIR|SWI|FIESTA|FSE|TSE|SPGR)\b"),
        re.compile(r"\bdiffusion[\s-]weighted", _IGNORE_CASE),
        re.compile(r"\b(?:(?:fast|turbo)\s+)?spin[\s-]echo\b", _IGNORE_CASE),
        re.compile(r"\bgradient[\s-](?:recalled[\s-])?echo\b", _IGNORE_CASE),
        re.compile(r"\b(?:\d(?:st|nd|rd|th)|first|second|dual|multi)[\s-]echo\b", _IGNORE_CASE),
        re.compile(r"\becho[\s-](?:times?|trains?|planar)\b", _IGNORE_CASE),
        re.compile(r"\binversion[\s-]recovery\b", _IGNORE_CASE),
        re.compile(r"\bflow[\s-]voids?\b", _IGNORE_CASE),
        re.compile(r"\bgadolinium", _IGNORE_CASE),
        re.compile(r"\bsignal intensit", _IGNORE_CASE),
        re.compile(r"\b(?:hyper|hypo|iso)intens", _IGNORE_CASE),
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
        re.compile(r"\bhistopatholog", _IGNORE_CASE),
        re.compile(r"\bhistolog(?:y|ic(?:al)?)\s+(?:slides?|sections?|images?|specimens?|stain)", _IGNORE_CASE),
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
    "dermoscopy": [
        re.compile(r"\bderm(?:at)?oscop", _IGNORE_CASE),
        re.compile(r"\bepiluminescence", _IGNORE_CASE),
    ],
}

# Phrases that contain a modality word without naming a modality; they hide the mentions they overlap.
NOT_A_MODALITY: list[re.Pattern] = [
    # the fundus of the stomach, uterus or gallbladder
    re.compile(r"\b(?:gastric|uterine|uterus|stomach|gall[\s-]?bladder|bladder)\s+fund(?:us|i)\b", _IGNORE_CASE),
    re.compile(r"\bfund(?:us|i)\s+of\s+(?:the\s+)?(?:stomach|uterus|gall[\s-]?bladder|bladder)\b", _IGNORE_CASE),
    # vertebral levels T1, T2 ("T1 vertebra", "T2-T4", "T1 to T3")
    re.compile(
        r"\bT[12]\b(?=[\s-]*(?:T?\d{1,2}\b|to\s+T?\d|vertebra|vertebral|level|body|bodies|spinous|pedicle|nerve|"
        r"root|rib|segment|dis[ck]|fracture|compression))",
        _IGNORE_CASE,
    ),
]

# A mention that follows one of these within a few words names another study, not the one the report describes.
OTHER_STUDY_CUE = re.compile(
    r"\b(?:prior|previous|previously|earlier|recent|outside|old|initial|compare[ds]?|comparison|follow[\s-]?up|"
    r"subsequent|later|further|recommend\w*|suggest\w*|advis\w*|worthy|due|planned|scheduled|pending|awaiting|"
    r"await|seen\s+on|shown\s+on|than\s+on|than)\b(?:\W+\w+){0,5}\W*$",
    _IGNORE_CASE,
)
CUE_WINDOW = 60  # characters before a mention searched for a cue


class Mention(NamedTuple):
    modality: str | None  # None: a phrase that is not a modality (NOT_A_MODALITY)
    start: int
    end: int


def modality_mentions(report: str) -> list[Mention]:
    """Every modality phrase of `report` that no longer overlapping phrase hides, in text order."""
    found = [
        Mention(modality, match.start(), match.end())
        for modality, patterns in MODALITY_PATTERNS.items()
        for pattern in patterns
        for match in pattern.finditer(report)
    ]
    blockers = found + [
        Mention(None, match.start(), match.end()) for p in NOT_A_MODALITY for match in p.finditer(report)
    ]

    def hidden(mention: Mention) -> bool:
        return any(
            other.start <= mention.start
            and mention.end <= other.end
            and other.modality != mention.modality
            and (other.modality is None or other.end - other.start > mention.end - mention.start)
            for other in blockers
        )

    return sorted((mention for mention in found if not hidden(mention)), key=lambda mention: mention.start)


def names_another_study(report: str, mention: Mention) -> bool:
    """Does a cue such as "prior", "compared with" or "recommend" precede the mention by a few words?"""
    return OTHER_STUDY_CUE.search(report[max(0, mention.start - CUE_WINDOW) : mention.start]) is not None


def detect_modality(report: str) -> str | None:
    """The one modality a report describes, or None when it names none, or more than one.

    >>> detect_modality("Axial T2-weighted image shows a hyperintense lesion.")
    'MRI'
    >>> detect_modality("Chest radiograph; compare with the prior CT.")
    'X-ray'
    >>> detect_modality("Chest X-ray and CT images of a 36-year-old man.") is None
    True
    """
    described = {mention.modality for mention in modality_mentions(report) if not names_another_study(report, mention)}
    return described.pop() if len(described) == 1 else None


def report_type_index(report: str, type_names: Sequence[str]) -> int:
    """Index of the report's modality in `type_names` (a config's `expert_names`), or `UNKNOWN_REPORT_TYPE`."""
    return type_name_to_index(detect_modality(report), type_names)


def type_name_to_index(name: str | None, type_names: Sequence[str]) -> int:
    """Index of a modality name in `type_names`, matched without case, or `UNKNOWN_REPORT_TYPE`."""
    if name is None:
        return UNKNOWN_REPORT_TYPE
    lowered = [type_name.lower() for type_name in type_names]
    return lowered.index(name.lower()) if name.lower() in lowered else UNKNOWN_REPORT_TYPE
