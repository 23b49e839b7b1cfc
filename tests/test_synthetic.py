"""The built-in synthetic stream: deterministic, sharded, with ground truth the reports agree with."""

import numpy as np
import pytest

from medmoe.training.report_types import detect_modality
from medmoe.training.synthetic import (
    EVAL_SEED,
    MODALITIES,
    TRAIN_SEED,
    Finding,
    location_words,
    make_phantom,
    synthetic_stream,
)


def rows(stream, count):
    return list(stream.take(count))


def test_stream_is_deterministic_per_seed_and_held_out_seed_differs():
    first = rows(synthetic_stream(seed=TRAIN_SEED, num_shards=3, rows_per_shard=4), 12)
    again = rows(synthetic_stream(seed=TRAIN_SEED, num_shards=3, rows_per_shard=4), 12)
    held_out = rows(synthetic_stream(seed=EVAL_SEED, num_shards=3, rows_per_shard=4), 12)
    assert [row["text"] for row in first] == [row["text"] for row in again]
    assert np.array_equal(np.asarray(first[5]["image"]), np.asarray(again[5]["image"]))
    assert [row["text"] for row in first] != [row["text"] for row in held_out]
    assert synthetic_stream(num_shards=5, rows_per_shard=2).num_shards == 5


def test_rows_carry_ground_truth_columns():
    row = rows(synthetic_stream(num_shards=1, rows_per_shard=3), 1)[0]
    assert set(row) == {"image", "text", "modality", "finding", "location", "finding_box"}
    assert row["modality"] in MODALITIES
    x0, y0, x1, y1 = row["finding_box"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


@pytest.mark.parametrize("modality", MODALITIES)
def test_report_states_modality_finding_and_location(modality):
    generator = np.random.default_rng(7)
    for _ in range(20):
        row = make_phantom(generator, image_size=64, modality=modality)
        assert detect_modality(row["text"]) == modality, row["text"]
        assert row["finding"] in row["text"] and row["location"] in row["text"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_finding_is_drawn_inside_its_box(modality):
    """Removing the finding changes pixels inside the box and almost none outside it."""
    seed = 11
    with_finding = make_phantom(np.random.default_rng(seed), image_size=96, modality=modality)
    pixels = np.asarray(with_finding["image"], dtype=np.float32)
    x0, y0, x1, y1 = (np.array(with_finding["finding_box"]) * 96).round().astype(int)
    inside = pixels[y0:y1, x0:x1]
    ring = np.concatenate(
        [
            pixels[max(y0 - 6, 0) : y0, x0:x1].reshape(-1, *pixels.shape[2:]),
            pixels[y1 : y1 + 6, x0:x1].reshape(-1, *pixels.shape[2:]),
        ]
    )
    assert abs(inside.mean() - ring.mean()) > 8, "the finding stands out from its surroundings"


def test_location_words_use_patient_side_in_radiology():
    left_of_image = Finding(x=-0.5, y=-0.6, radius=0.1)
    assert location_words("CT", left_of_image).startswith("right")
    assert location_words("fundus", left_of_image).startswith("left")
