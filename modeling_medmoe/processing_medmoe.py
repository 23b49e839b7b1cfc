# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""MedMoE processor: the image processor and any BERT-style (fast) tokenizer, plus word ids for the local loss."""

import unicodedata
from typing import Unpack

from transformers import BatchEncoding
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_medmoe import MedMoEImagesKwargs

NOT_A_WORD = -1


def is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(character).startswith("P") for character in text)


def word_ids_for_encoding(encoding: BatchEncoding, tokenizer, row: int) -> list[int]:
    """Word index of each token of row `row`: 0, 1, ... per word; -1 for special, padding and punctuation tokens.

    Word boundaries come from the fast tokenizer's `word_ids`, so the word pieces of a word share its index.
    """
    token_words = encoding.word_ids(row)
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"][row])
    word_text: dict[int, str] = {}
    for word, token in zip(token_words, tokens):
        if word is not None:
            word_text[word] = word_text.get(word, "") + token.removeprefix("##")
    kept_words = [word for word in sorted(word_text) if not is_punctuation(word_text[word])]
    renumbered = {word: index for index, word in enumerate(kept_words)}
    return [renumbered.get(word, NOT_A_WORD) if word is not None else NOT_A_WORD for word in token_words]


class MedMoEProcessorKwargs(ProcessingKwargs, total=False):
    """The processor's keyword arguments, by sub-processor (transformers' contract): `text_kwargs` go to the
    tokenizer, `images_kwargs` (`MedMoEImagesKwargs`: window, frame, size, ...) to the image processor."""

    images_kwargs: MedMoEImagesKwargs
    _defaults = {"common_kwargs": {"return_tensors": "pt"}}


class MedMoEProcessor(ProcessorMixin):
    """Prepares images and reports for `MedMoEModel`.

    `processor(images=..., text=..., padding=True, truncation=True)` returns `pixel_values` and the tokenizer's
    outputs plus `word_ids` [batch, tokens] (see `word_ids_for_encoding`), as torch tensors unless
    `return_tensors` says otherwise. Keyword arguments follow transformers' processor contract: a keyword is routed
    to the sub-processor that declares it (`window="lung"`, `frame=0`, `size=...` to the image processor;
    `padding`, `max_length`, ... to the tokenizer), or passed per sub-processor as `images_kwargs={...}` /
    `text_kwargs={...}` (`common_kwargs` go to both); a keyword given twice is refused with a ValueError, an unknown
    one is ignored with a warning.

    Args:
        image_processor: a `MedMoEImageProcessor`.
        tokenizer: a fast tokenizer (it must provide `word_ids`), e.g. any BERT tokenizer from the Hub.
    """

    valid_processor_kwargs = MedMoEProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)
        # What save_pretrained records for AutoProcessor (register_for_auto_class, below), known from the start so
        # that a loaded processor describes itself (to_dict) as the saved one does.
        self.auto_map = {"AutoProcessor": f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"}

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[MedMoEProcessorKwargs],
    ) -> BatchFeature:
        """images: anything `MedMoEImageProcessor` reads (DICOM included), one or a list; text: one report or a
        list. Returns `pixel_values`, the tokenizer's outputs and `word_ids`."""
        if images is None and text is None:
            raise ValueError("MedMoEProcessor needs images, text or both.")
        merged = self._merge_kwargs(MedMoEProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data = {}
        if text is not None:
            data.update(self.tokenize(text, **merged["text_kwargs"]))
        if images is not None:
            data.update(self.image_processor(images, **merged["images_kwargs"]))
        return BatchFeature(data=data, tensor_type=merged["text_kwargs"].get("return_tensors"))

    def tokenize(self, text: str | list[str], return_tensors: str | None = "pt", **text_kwargs) -> BatchEncoding:
        """Tokenise one report or a list of reports and add `word_ids`."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"MedMoEProcessor needs a fast tokenizer (for word_ids); got {type(self.tokenizer).__name__}."
            )
        reports = [text] if isinstance(text, str) else list(text)
        encoding = self.tokenizer(reports, **text_kwargs)
        data = dict(encoding)
        data["word_ids"] = [word_ids_for_encoding(encoding, self.tokenizer, row) for row in range(len(reports))]
        return BatchEncoding(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["word_ids", "pixel_values"]


MedMoEProcessor.register_for_auto_class("AutoProcessor")
