"""MedMoE processor: the image processor and any BERT-style (fast) tokenizer, plus word ids for the local loss."""

from __future__ import annotations

import unicodedata

from transformers import BatchEncoding
from transformers.processing_utils import ProcessorMixin

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


class MedMoEProcessor(ProcessorMixin):
    """Prepares images and reports for `MedMoEModel`.

    `processor(images=..., text=..., return_tensors="pt", padding=True, truncation=True)` returns `pixel_values`
    and the tokenizer's outputs plus `word_ids` [batch, tokens] (see `word_ids_for_encoding`).

    Args:
        image_processor: a `MedMoEImageProcessor`.
        tokenizer: a fast tokenizer (it must provide `word_ids`), e.g. any BERT tokenizer from the Hub.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", **text_kwargs) -> BatchEncoding:
        if images is None and text is None:
            raise ValueError("MedMoEProcessor needs images, text or both.")
        data = {}
        if text is not None:
            data.update(self.tokenize(text, return_tensors=return_tensors, **text_kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchEncoding(data=data, tensor_type=return_tensors)

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
