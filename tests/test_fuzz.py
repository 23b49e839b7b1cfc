"""Property-based fuzzing (hypothesis) of every entry point that takes outside input: the endpoint handler's
payloads, the zero-shot pipeline's inputs, the image processor (image and DICOM bytes, arrays) and the archive's
folder walk. Each generated input ends in a result or a clear error (ValueError, or the handler's {"error"}), within
a time bound per input (hypothesis' deadline) and a memory bound per test (peak resident memory growth).

In CI the inputs are derandomised (the same ones every run); elsewhere each run draws new ones.
"""

import base64
import os
import resource
from datetime import timedelta

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.hostile_inputs import HOSTILE_TEMPLATES, declared_png, dicom_bytes, png_bytes  # noqa: E402
from modeling_medmoe import MedMoEImageProcessor  # noqa: E402

from .helpers import endpoint_handler  # noqa: E402

EXAMPLES = int(os.environ.get("MEDMOE_FUZZ_EXAMPLES", 2000))  # generated inputs per entry point
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # the template and DICOM bombs took 33 s and 12.8 s
    derandomize=os.environ.get("CI") == "true",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
MEMORY_BOUND_BYTES = 500 * 2**20


@pytest.fixture
def memory_bound():
    """Fails the test when the process's peak resident memory grew by more than the bound during it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_BOUND_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"


SEEDS = [png_bytes(side=20), dicom_bytes(rows=16), dicom_bytes(rows=16, deflated=True), dicom_bytes(rows=8, frames=3)]


@st.composite
def mutated(draw, seed_bytes=st.sampled_from(SEEDS)):
    """A valid PNG or DICOM file with bytes flipped, cut or inserted: headers that lie, truncations, garbage."""
    data = bytearray(draw(seed_bytes))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if action == "flip":
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position : position + draw(st.integers(1, 64))]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position:]
        if not data:
            break
    return bytes(data)


image_bytes = st.one_of(
    mutated(),
    st.binary(max_size=512),
    st.sampled_from(SEEDS + [declared_png(30000, 30000), declared_png(8000, 8000), dicom_bytes(512, frames=2000)]),
    st.binary(max_size=200).map(lambda tail: b"\x00" * 128 + b"DICM" + tail),  # the magic, then garbage
)
arrays = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill).astype(dtype),
    st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
    st.sampled_from(["uint8", "uint16", "int16", "float32", "float64", "bool", "int64", "complex64"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**31), 2**31 - 1)),
)


@given(image=st.one_of(image_bytes, arrays), window=st.one_of(st.none(), st.text(max_size=12)), frame=st.none())
@FUZZ
def test_the_image_processor_gives_pixels_or_a_clear_error(image, window, frame, memory_bound):
    processor = MedMoEImageProcessor(size={"height": 16, "width": 16})
    try:
        pixel_values = processor(image, window=window, frame=frame)["pixel_values"]
    except ValueError:
        return
    assert pixel_values.shape[1:] == (3, 16, 16) and torch.isfinite(pixel_values).all()  # a 4-D array is a batch


text_or_junk = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_TEMPLATES), st.integers(), st.none())
labels = st.one_of(
    st.lists(st.one_of(st.text(max_size=30), st.integers()), max_size=8),
    st.text(max_size=60),
    st.none(),
    st.integers(),
    st.just([f"label {index}" for index in range(150)]),
)
image_payload = st.one_of(
    image_bytes,
    image_bytes.map(lambda data: base64.b64encode(data).decode()),
    image_bytes.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode()),
    st.text(max_size=40),
    st.integers(),
    st.none(),
    st.lists(image_bytes, max_size=3),
)
parameters = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "mode": st.one_of(st.sampled_from(["zero-shot", "image-embedding", "text-embedding"]), text_or_junk),
            "candidate_labels": labels,
            "hypothesis_template": text_or_junk,
            "window": st.one_of(st.none(), st.text(max_size=12), st.lists(st.floats(), max_size=3), st.integers()),
            "frame": st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.booleans()),
        },
    ),
)
label_lists = st.lists(st.text(min_size=1, max_size=30).filter(str.strip), min_size=1, max_size=6)
templates = st.builds(lambda before, after: before + "{}" + after, st.text(max_size=20), st.text(max_size=20))
valid_images = st.sampled_from(SEEDS).map(lambda data: base64.b64encode(data).decode())
well_formed = st.one_of(  # requests a client means to be right: they reach the model unless a value is off
    st.fixed_dictionaries(
        {
            "inputs": st.one_of(valid_images, mutated().map(lambda data: base64.b64encode(data).decode())),
            "parameters": st.fixed_dictionaries(
                {"candidate_labels": label_lists},
                optional={"hypothesis_template": templates, "window": st.sampled_from(["lung", "40,400", [0, 1]])},
            ),
        }
    ),
    st.fixed_dictionaries(
        {"inputs": st.lists(valid_images, min_size=1, max_size=3), "parameters": st.just({"mode": "image-embedding"})}
    ),
    st.fixed_dictionaries(
        {
            "inputs": st.lists(st.text(max_size=40), min_size=1, max_size=4),
            "parameters": st.just({"mode": "text-embedding"}),
        }
    ),
)
payloads = st.one_of(
    well_formed,
    st.fixed_dictionaries(
        {"inputs": st.one_of(image_payload, st.lists(st.text(max_size=30), max_size=4))},
        optional={"parameters": parameters},
    ),  # fmt: skip
    st.one_of(st.none(), st.text(max_size=10), st.lists(st.integers(), max_size=3)),
    st.dictionaries(st.text(max_size=8), st.none(), max_size=3),
)


@pytest.fixture(scope="module")
def handler(handler_folder):
    return endpoint_handler(handler_folder)


@given(payload=payloads)
@FUZZ
def test_the_handler_answers_every_payload(handler, payload, memory_bound):
    result = handler(payload)
    hypothesis.event("refused" if isinstance(result, dict) and "error" in result else "served")
    if isinstance(result, dict):
        assert set(result) in ({"error"}, {"embeddings", "experts", "backend"}, {"embeddings"}), result
        assert "error" not in result or isinstance(result["error"], str) and result["error"]
    else:
        assert isinstance(result, list) and all(set(entry) == {"label", "score"} for entry in result)


@pytest.fixture(scope="module")
def classifier(handler_folder):
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=str(handler_folder), trust_remote_code=True)


@given(
    image=st.one_of(st.sampled_from(SEEDS), image_bytes, arrays.filter(lambda array: array.ndim >= 2)),
    candidate_labels=st.one_of(label_lists, labels),
    template=st.one_of(st.none(), templates, text_or_junk),
)
@FUZZ
def test_the_pipeline_gives_scores_or_a_clear_error(classifier, image, candidate_labels, template, memory_bound):
    try:
        result = classifier(image, candidate_labels=candidate_labels, hypothesis_template=template)
    except ValueError:
        hypothesis.event("refused")
        return
    hypothesis.event("served")
    assert sum(entry["score"] for entry in result) == pytest.approx(1.0, abs=1e-4)


ENTRY_KINDS = ["png", "mutated", "garbage", "fifo", "dangling", "self_link", "folder_link", "folder", "empty"]


@st.composite
def archive_entries(draw):
    names = st.text(
        alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=["Cs"]), min_size=1, max_size=12
    ).filter(lambda name: name not in (".", ".."))
    suffix = st.sampled_from(["", ".png", ".dcm", ".jpg", ".txt", ".PNG", ".tiff"])
    return draw(st.lists(st.tuples(names, suffix, st.sampled_from(ENTRY_KINDS), mutated()), max_size=6))


def make_entry(folder, name: str, kind: str, data: bytes) -> None:
    path = folder / name
    if kind == "png":
        path.write_bytes(SEEDS[0])
    elif kind in ("mutated", "garbage"):
        path.write_bytes(data if kind == "mutated" else data[::-1])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(folder / "does-not-exist")
    elif kind == "self_link":
        path.symlink_to(path)
    elif kind == "folder_link":
        path.symlink_to(folder)
    elif kind == "folder":
        path.mkdir()
        (path / "inner.png").write_bytes(data)
    else:
        path.write_bytes(b"")


class CollectingWriter:
    def __init__(self):
        self.records, self.position, self.skipped = [], 0, []

    def add(self, records, position, skipped):
        self.records += records
        self.position = position
        self.skipped += skipped


@pytest.fixture(scope="module")
def archive_model(nano_folder):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(nano_folder, trust_remote_code=True).eval()
    return model, MedMoEImageProcessor.from_pretrained(nano_folder)


@given(entries=archive_entries())
@FUZZ
def test_the_folder_walk_skips_and_names_every_bad_entry(archive_model, entries, tmp_path_factory, memory_bound):
    from medmoe_archive import archive
    from medmoe_archive.decoding import prepare_rows
    from medmoe_archive.index import embed_batch
    from modeling_medmoe.image_encoder import ImageEncoder

    folder = tmp_path_factory.mktemp("walk")
    for name, suffix, kind, data in entries:
        if not (folder / (name + suffix)).exists() and not (folder / (name + suffix)).is_symlink():
            make_entry(folder, name + suffix, kind, data)
    rows = list(archive.folder_rows(folder))
    writer = CollectingWriter()
    model, image_processor = archive_model
    prepared = list(prepare_rows(rows, image_processor, thumbnail_size=16))
    embed_batch(list(enumerate(prepared)), ImageEncoder(model), writer)
    assert writer.position == len(rows) == len(writer.records) + len(writer.skipped)
    assert all(entry["reason"] and entry["id"] and entry["path"] for entry in writer.skipped)
