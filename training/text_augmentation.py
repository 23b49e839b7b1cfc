"""Report sentence sampling, the text augmentation of ConVIRT (Zhang et al. 2020) and GLoRIA: a training report is
sometimes replaced by one of its sentences, drawn at random.

Why: with whole reports, a batch's pairs are told apart by whatever words differ most (a finding, a diagnosis), and
the words naming the modality need not matter. A sentence alone ("Radiograph of the chest (PA view).") must still
find its image, so short queries such as zero-shot prompts land where their words say. The report-type label is
read from the whole report before sampling.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# A sentence ends at ., ! or ? followed by white space and a capital or a digit (not "e.g. the", "3.5 cm").
SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def split_sentences(report: str) -> list[str]:
    """The report's sentences, stripped, empty ones dropped."""
    return [sentence.strip() for sentence in SENTENCE_BOUNDARY.split(report) if sentence.strip()]


@dataclass(frozen=True)
class SentenceSampler:
    """With `probability`, one sentence of a report of two or more, uniformly; otherwise the report unchanged.

    Draws come from an RNG the caller seeds (`rng_for`), so a run is reproducible and a resumed run, which replays
    its epoch's rows, draws the same sentences again.
    """

    probability: float
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"sentence sampling probability must be in [0, 1], got {self.probability}")

    def rng_for(self, epoch: int, worker: int) -> random.Random:
        """The RNG of one DataLoader worker in one epoch."""
        return random.Random(f"{self.seed}/{epoch}/{worker}")

    def __call__(self, report: str, rng: random.Random) -> str:
        if rng.random() >= self.probability:
            return report
        sentences = split_sentences(report)
        return rng.choice(sentences) if len(sentences) > 1 else report
