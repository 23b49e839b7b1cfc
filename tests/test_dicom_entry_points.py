"""DICOM wherever an image goes in: the zero-shot pipeline, the endpoint handler, the demo and the data streams, on
pydicom's bundled real files; an undecodable DICOM gets the same clear error everywhere."""

import base64
from collections import Counter

import pytest
import torch

from modeling_medmoe import MedMoEModel

from .helpers import endpoint_handler

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

LABELS = ["CT", "MRI", "X-ray"]
CODEC_MESSAGE = "compressed as 'JPEG Extended"  # a non-conformant JPEG no installed decoder reads


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not bundled with this pydicom")
    return path


@pytest.fixture(scope="module")
def folder(handler_folder):
    return handler_folder


@pytest.fixture(scope="module")
def classifier(folder):
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def handler(folder):
    return endpoint_handler(folder)


def scores(result: list[dict]) -> dict[str, float]:
    return {entry["label"]: entry["score"] for entry in result}


def test_the_pipeline_is_medmoes_and_reads_dicom_paths_bytes_and_datasets(classifier):
    assert type(classifier).__name__ == "MedMoEZeroShotImageClassificationPipeline"
    path = bundled("CT_small.dcm")
    from_path = scores(classifier(path, candidate_labels=LABELS))
    assert set(from_path) == set(LABELS) and sum(from_path.values()) == pytest.approx(1, abs=1e-5)
    for same in (open(path, "rb").read(), pydicom.dcmread(path)):
        assert scores(classifier(same, candidate_labels=LABELS)) == pytest.approx(from_path, abs=1e-6)


def test_pipeline_window_and_frame_reach_the_image_processor(classifier, folder):
    from transformers import AutoImageProcessor, AutoModel

    path = bundled("CT_small.dcm")
    lung = scores(classifier(path, candidate_labels=LABELS, window="lung"))
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        image_embeds = model.get_image_features(**processor(path, window="lung")).pooler_output
        expected = model.zero_shot_probabilities(image_embeds, model.get_zero_shot_class_embeddings(tokenizer, LABELS))
    assert [lung[label] for label in LABELS] == pytest.approx(expected[0].tolist(), abs=1e-6)
    frames = [scores(classifier(bundled("rtdose.dcm"), candidate_labels=LABELS, frame=index)) for index in (0, 7)]
    assert frames[0] != pytest.approx(frames[1], abs=1e-9)
    with pytest.raises(ValueError, match="frame=99 is out of range"):
        classifier(bundled("rtdose.dcm"), candidate_labels=LABELS, frame=99)


def test_handler_reads_dicom_bytes_and_base64_with_window_and_frame(handler, classifier):
    data = open(bundled("CT_small.dcm"), "rb").read()
    for payload in (data, base64.b64encode(data).decode()):
        result = handler({"inputs": payload, "parameters": {"candidate_labels": LABELS, "window": "lung"}})
        expected = scores(classifier(data, candidate_labels=LABELS, window="lung"))
        assert scores(result) == pytest.approx(expected, abs=1e-6)
    dose = open(bundled("rtdose.dcm"), "rb").read()
    embeddings = [
        handler({"inputs": dose, "parameters": {"mode": "image-embedding", "frame": frame}})["embeddings"][0]
        for frame in (0, 7)
    ]
    assert embeddings[0] != pytest.approx(embeddings[1], abs=1e-9)
    bad_window = handler({"inputs": data, "parameters": {"candidate_labels": LABELS, "window": "liver"}})
    assert "Unknown window 'liver'" in bad_window["error"]


def test_demo_takes_a_dicom_file_and_a_window(folder):
    from medmoe.model_card.app import Demo

    scores_by_label, expert, picture = Demo(str(folder)).predict(bundled("CT_small.dcm"), "CT, MRI", "40,400")
    assert (
        list(scores_by_label) == ["CT", "MRI"]
        and expert in MedMoEModel.config_class.from_pretrained(folder).expert_names
    )
    assert picture.size == (128, 128) and picture.mode == "RGB"  # CT_small.dcm is 128 x 128


def test_streams_read_dicom_bytes_and_paths_and_skip_undecodable_ones(processor, nano_config, tmp_path):
    import datasets

    from medmoe.training import data

    ct, mr, compressed = (bundled(name) for name in ("CT_small.dcm", "MR_small.dcm", "JPEG-lossy.dcm"))
    images = [  # an image column as datasets stores one: the file's bytes, or its path
        {"bytes": open(ct, "rb").read(), "path": None},
        {"bytes": None, "path": mr},
        {"bytes": open(compressed, "rb").read(), "path": None},
        {"bytes": open(mr, "rb").read(), "path": None},
    ]
    texts = ["Axial CT of the chest.", "Axial MRI of the brain.", "Axial MRI, compressed.", "Axial MRI again."]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).to_parquet(tmp_path / "d.parquet")
    stream, image_column, text_column = data.open_stream(
        data.DataArguments(train_files=str(tmp_path / "*.parquet")), "train"
    )
    prepare = data.RowPreparer(processor, nano_config.expert_names, image_column, text_column)
    batches = data.BatchStream(data.prepare_stream(stream, image_column=image_column), prepare,
                               data.BatchCollator(processor), batch_size=3, drop_last=False)  # fmt: skip
    batches = list(data.make_dataloader(batches, num_workers=0))
    skipped = sum((Counter(batch["skipped"]) for batch in batches), Counter())
    assert skipped == {"undecodable_dicom": 1}
    assert batches[0]["texts"] == ["Axial CT of the chest.", "Axial MRI of the brain.", "Axial MRI again."]
    expected = processor.image_processor(ct)["pixel_values"][0]
    torch.testing.assert_close(batches[0]["pixel_values"][0], expected)
    with pytest.raises(data.SkipRow, match=CODEC_MESSAGE):
        prepare({"image": open(compressed, "rb").read(), "text": "x"})


def test_an_undecodable_dicom_gives_the_same_error_everywhere(classifier, handler, folder):
    from medmoe.model_card.app import Demo

    path = bundled("JPEG-lossy.dcm")
    data = open(path, "rb").read()
    with pytest.raises(ValueError, match=CODEC_MESSAGE) as from_pipeline:
        classifier(path, candidate_labels=LABELS)
    from_handler = handler({"inputs": base64.b64encode(data).decode(), "parameters": {"candidate_labels": LABELS}})
    with pytest.raises(ValueError, match=CODEC_MESSAGE) as from_demo:
        Demo(str(folder)).predict(data, "CT")
    assert from_handler["error"] == str(from_pipeline.value) == str(from_demo.value)
