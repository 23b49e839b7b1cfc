"""Medical inputs as hospitals have them: DICOM (pydicom's bundled real test files), windows, 16-bit and float."""

import copy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_medmoe import MedMoEImageProcessor
from modeling_medmoe.dicom import read_dicom
from modeling_medmoe.image_processing_medmoe import WINDOW_PRESETS, apply_window

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not bundled with this pydicom")
    return path


@pytest.fixture
def processor():
    return MedMoEImageProcessor(size={"height": 64, "width": 64}, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)


def hounsfield(dataset) -> torch.Tensor:
    """What the modality LUT must give, computed here from the stored pixels and the rescale tags."""
    slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
    return torch.from_numpy(dataset.pixel_array.astype(np.float32) * slope + intercept)


def test_ct_rescale_slope_and_intercept_give_hounsfield_units():
    dataset = pydicom.dcmread(bundled("CT_small.dcm"))
    assert float(dataset.RescaleIntercept) == -1024
    pixels = read_dicom(bundled("CT_small.dcm"))
    torch.testing.assert_close(pixels.values, hounsfield(dataset))
    assert pixels.values.min() < -500, "air is about -1000 HU"


@pytest.mark.parametrize("window", sorted(WINDOW_PRESETS))
def test_window_presets_clip_hounsfield_units(processor, window):
    dataset = pydicom.dcmread(bundled("CT_small.dcm"))
    unit = processor.to_unit_range(bundled("CT_small.dcm"), window=WINDOW_PRESETS[window])
    torch.testing.assert_close(unit[0], apply_window(hounsfield(dataset), WINDOW_PRESETS[window]))
    by_name = processor(bundled("CT_small.dcm"), window=window)["pixel_values"]
    by_numbers = processor(bundled("CT_small.dcm"), window=WINDOW_PRESETS[window])["pixel_values"]
    torch.testing.assert_close(by_name, by_numbers)


def test_presets_differ_and_a_bad_window_is_refused(processor):
    lung = processor(bundled("CT_small.dcm"), window="lung")["pixel_values"]
    bone = processor(bundled("CT_small.dcm"), window="bone")["pixel_values"]
    assert (lung - bone).abs().mean() > 0.05
    with pytest.raises(ValueError, match="Unknown window 'liver'"):
        processor(bundled("CT_small.dcm"), window="liver")
    with pytest.raises(ValueError, match="width must be positive"):
        MedMoEImageProcessor(window=(40, 0))
    as_text = processor(bundled("CT_small.dcm"), window="-600,1500")["pixel_values"]  # a command line's form
    torch.testing.assert_close(as_text, lung)
    with pytest.raises(ValueError, match="width must be positive"):
        processor(bundled("CT_small.dcm"), window="40,-1")


def test_the_files_own_window_is_the_default(processor):
    dataset = pydicom.dcmread(bundled("MR_small.dcm"))
    assert (float(dataset.WindowCenter), float(dataset.WindowWidth)) == (600, 1600)
    unit = processor.to_unit_range(dataset)
    torch.testing.assert_close(unit[0], apply_window(hounsfield(dataset), (600.0, 1600.0)))


def test_voi_lut_sequence_replaces_the_window(processor):
    dataset = pydicom.dcmread(bundled("CT_small.dcm"))
    item = pydicom.Dataset()
    first_input, entries = -1024, 4096  # LUT entry i maps input first_input + i
    lut = ((np.arange(entries) // 256) * 4369).astype(np.uint16)  # 16 steps up to 65535: no window does this
    item.LUTDescriptor = [entries, first_input, 16]
    item.LUTData = lut.tolist()
    dataset.VOILUTSequence = pydicom.Sequence([item])
    index = (hounsfield(dataset).long() - first_input).clamp(0, entries - 1)
    expected = torch.from_numpy(lut.astype(np.float32))[index] / 65535
    torch.testing.assert_close(processor.to_unit_range(dataset)[0], expected)


def test_monochrome1_is_inverted(processor):
    dataset = pydicom.dcmread(bundled("MR_small.dcm"))
    inverted = copy.deepcopy(dataset)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    torch.testing.assert_close(processor.to_unit_range(inverted), 1.0 - processor.to_unit_range(dataset))


def test_multi_frame_takes_the_middle_frame_or_the_one_asked_for(processor):
    path = bundled("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 15
    middle = read_dicom(path)
    expected = hounsfield(pydicom.dcmread(path))[7]
    torch.testing.assert_close(middle.values, expected)
    torch.testing.assert_close(processor(path)["pixel_values"], processor(path, frame=7)["pixel_values"])
    assert not torch.equal(processor(path, frame=0)["pixel_values"], processor(path, frame=7)["pixel_values"])
    with pytest.raises(ValueError, match="frame=15 is out of range: this DICOM has 15 frames"):
        processor(path, frame=15)


def test_colour_dicom_keeps_its_channels(processor):
    unit = processor.to_unit_range(bundled("ExplVR_BigEnd.dcm"))
    assert unit.shape[0] == 3 and not torch.equal(unit[0], unit[2])


def test_a_compressed_dicom_without_its_codec_names_the_package(processor, monkeypatch):
    import pydicom.pixels

    from modeling_medmoe import dicom

    def no_decoder(*args, **kwargs):
        raise RuntimeError("Unable to decode as there are no pixel data plugins available")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    monkeypatch.setattr(dicom, "DECODER_MODULES", ("no_such_decoder",))
    with pytest.raises(ValueError, match='JPEG-LS Lossless.*pip install "medmoe\\[dicom\\]"'):
        processor(bundled("MR_small_jpeg_ls_lossless.dcm"))


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
     "MR_small_expb.dcm", "MR_small_implicit.dcm"],
)  # fmt: skip
def test_lossless_and_big_endian_encodings_give_the_uncompressed_pixels(name):
    """With the dicom extra's decoders (pylibjpeg), JPEG-LS, RLE and JPEG 2000 lossless and big-endian files hold
    exactly the pixels of MR_small.dcm."""
    pytest.importorskip("pylibjpeg")
    torch.testing.assert_close(read_dicom(bundled(name)).values, read_dicom(bundled("MR_small.dcm")).values)


def test_a_lossy_jpeg_dicom_decodes_close_to_the_original():
    pytest.importorskip("pylibjpeg")
    lossy = read_dicom(bundled("SC_rgb_jpeg_dcmtk.dcm")).values.float()
    original = read_dicom(bundled("SC_rgb_rle.dcm")).values.float()  # RLE is lossless
    assert lossy.shape == original.shape and (lossy - original).abs().mean() < 5


def test_a_truncated_dicom_gives_a_clear_error(processor):
    with pytest.raises(ValueError, match="Cannot (read|decode) this DICOM's pixel data"):
        processor(bundled("MR_truncated.dcm"))


def test_without_pydicom_the_error_names_the_extra(processor, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "medmoe\[dicom\]"'):
        read_dicom(bundled("CT_small.dcm"))


def test_16_bit_png_files_and_float_arrays_take_a_window_or_percentiles(processor, tmp_path):
    values = np.tile(np.linspace(0, 4000, 80), (40, 1)).astype(np.uint16)
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    from_file = processor.to_unit_range(str(path))
    from_array = processor.to_unit_range(values)
    torch.testing.assert_close(from_file, from_array)
    assert from_file.min() == 0 and from_file.max() == 1, "percentile window spreads the data over [0, 1]"
    windowed = processor.to_unit_range(values.astype(np.float32) - 1024, window=(40.0, 400.0))
    torch.testing.assert_close(windowed[0], apply_window(torch.from_numpy(values.astype(np.float32) - 1024), (40, 400)))


def test_window_and_frame_are_saved_with_the_processor(tmp_path):
    MedMoEImageProcessor(window="lung", frame=2).save_pretrained(tmp_path)
    reloaded = MedMoEImageProcessor.from_pretrained(tmp_path)
    assert reloaded.window == "lung" and reloaded.frame == 2


def test_a_frame_count_that_is_not_a_number_is_worked_out_from_the_pixel_data():
    """badVR.dcm's Number of Frames is "1A"; its 10 x 10 uncompressed pixel data holds one frame."""
    assert pydicom.dcmread(bundled("badVR.dcm"), stop_before_pixels=True).get_item("NumberOfFrames").value == b"1A"
    assert read_dicom(bundled("badVR.dcm")).values.shape == (10, 10)
