# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The limits on what one input may cost: set here once, checked before any expensive work.

A hosted endpoint is reachable by anyone its owner lets in, so every entry point that takes outside input (the
image processor, the zero-shot pipeline, the endpoint handler, the demo, the archive tools) refuses an input
above these limits with a `InputTooLarge` error naming the limit, before decoding or embedding anything:
image and DICOM sizes are read from their headers, DICOM pixel data is decoded one frame at a time, and a deflated
DICOM is inflated only as far as its header declares.

The defaults suit a hosted endpoint; a model folder carries its own (the image processor's `input_limits` in
preprocessor_config.json), and `MedMoEImageProcessor(input_limits={...})` changes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class InputTooLarge(ValueError):
    """An input above one of the `InputLimits`; the message names the limit and how to change it."""


@dataclass(frozen=True)
class InputLimits:
    """What one request (or one row of a stream) may hold.

    max_image_pixels: rows x columns of one image or one DICOM frame (40M: a 6,300 px square; a digital mammogram is
        about 24M).
    max_frames: frames of one multi-frame DICOM (only the chosen frame is decoded; the limit bounds the file).
    max_image_bytes: the encoded size of one image or DICOM file as sent (64 MiB).
    max_images: images in one embedding request.
    max_texts: texts in one embedding request; max_text_characters: characters of one text.
    max_candidate_labels: labels of one zero-shot request; max_label_characters: characters of one label.
    max_template_characters: characters of one prompt template (plain text with one {}).
    url_timeout_seconds: how long a URL input may take to answer (connect and each read).
    """

    max_image_pixels: int = 40_000_000
    max_frames: int = 1_000
    max_image_bytes: int = 64 * 2**20
    max_images: int = 64
    max_texts: int = 256
    max_text_characters: int = 20_000
    max_candidate_labels: int = 100
    max_label_characters: int = 200
    max_template_characters: int = 300
    url_timeout_seconds: float = 10.0

    @classmethod
    def from_dict(cls, values: dict | None) -> "InputLimits":
        """Limits from a (saved) dict; missing keys keep their defaults, unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ValueError(f"Unknown input limits {unknown}; the limits are {sorted(known)}.")
        return cls(**(values or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, name: str, value: int | float, what: str) -> None:
        """Raise InputTooLarge when `value` exceeds the limit `name`; `what` says what was measured."""
        limit = getattr(self, name)
        if value > limit:
            raise InputTooLarge(
                f"{what} is {value:,}, above the limit {name}={limit:,} (set it in the image processor's input_limits)."
            )
