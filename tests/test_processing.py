"""MedMoEImageProcessor inputs and MedMoEProcessor word ids."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_medmoe import MedMoEImageProcessor
from modeling_medmoe.processing_medmoe import NOT_A_WORD

SIZE = {"height": 32, "width": 48}


@pytest.fixture(scope="module")
def image_processor():
    return MedMoEImageProcessor(size=SIZE, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))


def gradient(height=40, width=60):
    return np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray((gradient() * 255).astype(np.uint8)),  # L
        Image.fromarray((gradient() * 255).astype(np.uint8)).convert("RGB"),
        Image.fromarray((gradient() * 255).astype(np.uint8)).convert("RGBA"),
        Image.fromarray((gradient() * 255).astype(np.uint8)).convert("P"),
        Image.fromarray((gradient() * 65535).astype(np.uint16)),  # I;16
        (gradient() * 255).astype(np.uint8),
        (gradient() * 4095).astype(np.uint16),
        gradient(),
        gradient() * 3000.0 - 1000.0,  # CT-like numbers
        np.stack([gradient()] * 3, axis=-1),
        np.stack([(gradient() * 255).astype(np.uint8)] * 3, axis=0),  # CxHxW
        torch.from_numpy(gradient())[None],  # 1xHxW tensor
        torch.from_numpy(np.stack([gradient()] * 3)),
    ],
    ids=lambda image: type(image).__name__ + str(getattr(image, "mode", getattr(image, "dtype", ""))),
)
def test_every_accepted_input_becomes_the_same_normalised_gradient(image_processor, image):
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, SIZE["height"], SIZE["width"])
    assert pixel_values.dtype == torch.float32
    row = pixel_values[0, 0, SIZE["height"] // 2]
    assert row[0] < 0.15 and row[-1] > 0.85, "dark on the left, bright on the right"
    assert torch.all(row[1:] >= row[:-1] - 1e-3), "intensity increases left to right"
    torch.testing.assert_close(pixel_values[0, 0], pixel_values[0, 2])


def test_a_batch_of_mixed_sizes_is_resized_and_center_cropped(image_processor):
    images = [np.zeros((10, 200), np.uint8), np.full((300, 30), 255, np.uint8)]
    pixel_values = image_processor(images)["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 48)
    assert pixel_values[0].max() == 0 and pixel_values[1].min() == 1


def test_normalisation_uses_mean_and_std():
    processor = MedMoEImageProcessor(size={"height": 8, "width": 8}, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    pixel_values = processor(np.full((8, 8), 255, np.uint8))["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.full((1, 3, 8, 8), 2.0))


@pytest.mark.parametrize(
    "bad_input, message",
    [
        (3.5, "Cannot read an image of type float"),
        (np.zeros((5, 5, 2)), "shape"),
        (np.zeros((2, 3, 4, 4, 4)), "shape"),
        (np.zeros((0, 5)), "empty image"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.zeros((4, 4), dtype=np.complex64), "dtype"),
        ([], "empty list"),
    ],
)
def test_unreadable_inputs_say_what_was_given_and_what_is_accepted(image_processor, bad_input, message):
    with pytest.raises(ValueError, match=message) as error:
        image_processor(bad_input)
    assert "expected" in str(error.value) or "NaN" in str(error.value)


def test_word_ids_merge_word_pieces_and_drop_punctuation(processor):
    report = "Pneumomediastinum-free lungs, well-expanded."
    encoding = processor(text=[report, "ct"], padding=True, return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    word_ids = encoding["word_ids"][0].tolist()
    words = {}
    for token, word in zip(tokens, word_ids):
        if word != NOT_A_WORD:
            words[word] = words.get(word, "") + token.removeprefix("##")
    assert list(words.values()) == ["pneumomediastinum", "free", "lungs", "well", "expanded"]
    assert any(token.startswith("##") for token in tokens), "the test needs a word split into pieces"
    assert word_ids[0] == NOT_A_WORD and tokens[0] == "[CLS]"
    assert encoding["word_ids"].shape == encoding["input_ids"].shape
    assert encoding["word_ids"][1].tolist().count(0) >= 1 and encoding["word_ids"][1].max() == 0


def test_processor_joins_images_and_text(processor, images):
    encoding = processor(images=images[:2], text=["CT", "MRI"], padding=True)
    assert set(encoding) == {"input_ids", "token_type_ids", "attention_mask", "word_ids", "pixel_values"}
    with pytest.raises(ValueError, match="needs images, text or both"):
        processor()


def test_window_and_frame_reach_the_image_processor_and_conflicts_are_refused(processor):
    """transformers' processor contract: a keyword goes to the sub-processor that declares it, or is given per
    sub-processor; one given twice is refused."""
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm", download=False)
    windowed = processor.image_processor(ct, window="lung")["pixel_values"]
    assert not torch.allclose(windowed, processor.image_processor(ct)["pixel_values"])
    for kwargs in ({"window": "lung"}, {"images_kwargs": {"window": "lung"}}, {"common_kwargs": {"window": "lung"}}):
        out = processor(images=ct, text=["Axial CT of the chest."], padding=True, **kwargs)
        torch.testing.assert_close(out["pixel_values"], windowed)
        assert out["input_ids"].shape == out["word_ids"].shape
    with pytest.raises(ValueError, match="window was passed two times"):
        processor(images=ct, text="chest", window="lung", images_kwargs={"window": "brain"})
    with pytest.raises(ValueError, match="padding was passed two times"):
        processor(text="chest", padding="max_length", text_kwargs={"padding": "do_not_pad"})
    rtdose = get_testdata_file("rtdose.dcm", download=False)
    torch.testing.assert_close(processor(images=rtdose, frame=0)["pixel_values"],
                               processor.image_processor(rtdose, frame=0)["pixel_values"])  # fmt: skip
