"""A stream that mixes many kinds of malformed rows among good ones: every bad row is skipped and counted by
reason, every usable one (odd image modes included) is kept, and nothing crashes."""

import io
from collections import Counter

import datasets
import numpy as np
from PIL import Image

from medmoe.training import data

GOOD_TEXT = "Axial CT of the abdomen with a small hypodense lesion."


def encoded(image, image_format="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def good_image(mode="L"):
    pixels = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def rows_with_expected_counts(tmp_path):
    png = encoded(good_image())
    huge = encoded(Image.new("L", (9000, 9000)))  # 81 M pixels, a few kB of PNG: the decompression-bomb guard
    float_tiff = encoded(Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32)), "TIFF")
    bad = [
        ({"image": {"bytes": png[: len(png) // 2], "path": None}, "text": GOOD_TEXT}, "undecodable_image"),  # truncated
        ({"image": {"bytes": b"", "path": None}, "text": GOOD_TEXT}, "empty_image_bytes"),
        ({"image": {"bytes": b"this is not an image", "path": None}, "text": GOOD_TEXT}, "undecodable_image"),
        ({"image": {"bytes": png[:8], "path": None}, "text": GOOD_TEXT}, "undecodable_image"),  # header only
        ({"image": {"bytes": png[:40] + b"\x00" * 200, "path": None}, "text": GOOD_TEXT}, "undecodable_image"),
        ({"image": {"bytes": huge, "path": None}, "text": GOOD_TEXT}, "too_many_pixels"),
        ({"image": {"bytes": float_tiff, "path": None}, "text": GOOD_TEXT}, "unusable_image"),  # NaN pixels
        ({"image": {"bytes": None, "path": str(tmp_path / "gone.png")}, "text": GOOD_TEXT}, "missing_image_file"),
        ({"image": {"bytes": None, "path": None}, "text": GOOD_TEXT}, "missing_image"),
        ({"image": None, "text": GOOD_TEXT}, "missing_image"),
        ({"text": GOOD_TEXT}, "missing_image"),  # no image column at all
        ({"image": 12345, "text": GOOD_TEXT}, "unsupported_image_value"),
        ({"image": {"bytes": png, "path": None}, "text": ""}, "empty_report"),
        ({"image": {"bytes": png, "path": None}, "text": "   \n\t "}, "empty_report"),
        ({"image": {"bytes": png, "path": None}, "text": "CT " * 10_000}, "overlong_report"),
        ({"image": {"bytes": png, "path": None}, "text": None}, "missing_text"),
        ({"image": {"bytes": png, "path": None}}, "missing_text"),  # no text column at all
        ({"image": {"bytes": png, "path": None}, "text": 42}, "text_not_a_string"),
        ({"image": {"bytes": png, "path": None}, "text": ["a", "list"]}, "text_not_a_string"),
        (
            {"image": {"bytes": encoded(Image.new("RGB", (1, 1)), "JPEG")[:30], "path": None}, "text": GOOD_TEXT},
            "undecodable_image",
        ),  # truncated JPEG
        ({"image": "", "text": GOOD_TEXT}, "missing_image"),
    ]
    kept_modes = ["CMYK", "P", "LA", "1", "I;16", "RGBA", "I", "F"]
    good = [{"image": {"bytes": png, "path": None}, "text": GOOD_TEXT} for _ in range(6)]
    for mode in kept_modes:
        image = (
            good_image("L").convert(mode)
            if mode not in ("I;16",)
            else Image.fromarray((np.random.default_rng(1).random((30, 30)) * 4000).astype(np.uint16))
        )
        image_format = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
        good.append({"image": {"bytes": encoded(image, image_format), "path": None}, "text": GOOD_TEXT})
    rows = []
    for index in range(max(len(bad), len(good))):
        if index < len(good):
            rows.append(good[index])
        if index < len(bad):
            rows.append(bad[index][0])
    return rows, Counter(reason for _, reason in bad), len(good), len(bad)


def test_malformed_rows_are_skipped_and_counted_exactly(processor, nano_config, tmp_path):
    rows, expected, good_count, bad_count = rows_with_expected_counts(tmp_path)
    assert bad_count >= 20
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    prepare = data.RowPreparer(processor, nano_config.expert_names, "image", "text", max_report_characters=5000)
    batches = data.BatchStream(stream, prepare, data.BatchCollator(processor), batch_size=4, drop_last=False)
    skipped, kept = Counter(), 0
    for batch in data.make_dataloader(batches, num_workers=0):
        skipped.update(batch["skipped"])
        if "pixel_values" in batch:
            kept += batch["pixel_values"].shape[0]
            assert batch["pixel_values"].isfinite().all()
    assert dict(skipped) == dict(expected)
    assert kept == good_count
