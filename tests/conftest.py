"""Shared fixtures: a tokenizer trained offline, a nano model sized to it, a processor and a small paired batch; a
saved nano folder; an archive folder of phantoms and DICOM files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medmoe.training.tokenizer import train_wordpiece_tokenizer
from modeling_medmoe import MedMoEConfig, MedMoEImageProcessor, MedMoEModel, MedMoEProcessor

REPORTS = [
    "Chest radiograph shows a small nodule in the left upper lobe.",
    "Axial CT of the abdomen with a hypodense lesion in the liver.",
    "T2-weighted MRI: hyperintense focus in the right frontal lobe.",
    "Breast ultrasound shows a hypoechoic mass at the 2 o'clock position.",
    "H&E stained section with a dense cluster of atypical cells.",
    "Fundus photograph with drusen near the macula.",
    "No acute findings.",
    "Unremarkable study; pneumothorax-free lungs, well-expanded.",
]


@pytest.fixture(scope="session", autouse=True)
def subprocess_temporary_files_in_pytest_tmp(tmp_path_factory):
    """Child processes (torchrun, `accelerate launch`, benchmark scripts) write their temporary files, such as the
    torchelastic_* log folder torchrun leaves behind after every run, inside pytest's own temporary tree, which pytest
    prunes, instead of the system's temporary directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("subprocess_tmp")))
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return train_wordpiece_tokenizer(REPORTS * 4, vocab_size=300)


@pytest.fixture(scope="session")
def nano_config(tokenizer) -> MedMoEConfig:
    config = MedMoEConfig.from_preset("nano")
    config.text_config.vocab_size = tokenizer.vocab_size
    return config


@pytest.fixture
def model(nano_config) -> MedMoEModel:
    torch.manual_seed(0)
    return MedMoEModel(nano_config)


@pytest.fixture(scope="session")
def processor(nano_config, tokenizer) -> MedMoEProcessor:
    side = nano_config.vision_config.image_size
    return MedMoEProcessor(
        image_processor=MedMoEImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer
    )


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, size=(70 + 5 * i, 90), dtype=np.uint8)) for i in range(8)]


@pytest.fixture
def batch(processor, images):
    return processor(images=images, text=REPORTS, return_tensors="pt", padding=True, truncation=True)


@pytest.fixture(scope="session")
def nano_folder(tmp_path_factory, nano_config, processor):
    """A saved nano model folder (seeded weights, processor and tokenizer) that tests read and never change."""
    folder = tmp_path_factory.mktemp("nano_model")
    torch.manual_seed(0)
    MedMoEModel(nano_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def handler_folder(tmp_path_factory, nano_folder):
    """The nano folder with the endpoint handler beside it, as a release folder carries it."""
    import shutil

    folder = tmp_path_factory.mktemp("release_model") / "nano"
    shutil.copytree(nano_folder, folder)
    shutil.copyfile("model_card/handler.py", folder / "handler.py")
    return folder


ARCHIVE_ROWS = 40  # phantoms in the archive folder


@pytest.fixture(scope="session")
def phantoms():
    from medmoe.training.synthetic import synthetic_stream

    return list(synthetic_stream(seed=11, num_shards=1, rows_per_shard=ARCHIVE_ROWS, image_size=64))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, phantoms):
    """Phantoms as PNG files in nested modality folders, a DICOM without suffix, a compressed DICOM that cannot be
    decoded here, and a broken PNG."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("archive")
    for number, row in enumerate(phantoms):
        folder = root / row["modality"] / ("older" if number % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{number:03d}.png")
    shutil.copyfile(get_testdata_file("CT_small.dcm", download=False), root / "CT" / "series_1")
    shutil.copyfile(get_testdata_file("JPEG-lossy.dcm", download=False), root / "MRI" / "lossless.dcm")
    (root / "broken.png").write_bytes(b"not a png")
    return root
