"""How much of a real DICOM archive the image processor reads: pydicom's bundled test files that hold pixel data.

    python -m benchmarks.dicom_decoding            # the share decoded, and each file that was not, with the reason

pydicom's wheel bundles real DICOM files in many transfer syntaxes (uncompressed little and big endian, deflated,
JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, RLE), with and without the 128-byte preamble. Each file
that holds pixel data goes through `MedMoEImageProcessor.to_display` (what medmoe-index does with a file); the
compressed ones need the `dicom` extra's decoders (pylibjpeg with its libjpeg, openjpeg and rle plugins). Prints the
decoders found, a line per file that could not be read, and JSON with the share decoded.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from benchmarks.common import print_json
from modeling_medmoe import MedMoEImageProcessor

DECODERS = ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm")
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # pixel data, float and double float pixel data
IMAGE_ELEMENTS = ("Rows", "Columns", "BitsAllocated")  # what any image's pixel data needs to be read at all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="also list the files that were decoded")
    return parser.parse_args(argv)


def files_with_pixel_data() -> list[tuple[Path, bool]]:
    """pydicom's bundled test files (no download) whose dataset holds pixel data, each with whether its header has
    the elements an image needs (IMAGE_ELEMENTS; two test files leave them out on purpose)."""
    import pydicom
    from pydicom.data import get_testdata_files

    found = []
    for name in sorted(set(get_testdata_files("*"))):
        path = Path(name)
        if path.suffix.lower() not in ("", ".dcm") or not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path, force=True, defer_size=1024)
        except Exception:  # noqa: BLE001 - a file pydicom cannot parse at all is no DICOM image to count
            continue
        if any(tag in dataset for tag in PIXEL_DATA_TAGS):
            found.append((path, all(element in dataset for element in IMAGE_ELEMENTS)))
    return found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    installed = [name for name in DECODERS if importlib.util.find_spec(name) is not None]
    print(f"Decoders installed: {', '.join(installed) or 'none'}")
    processor = MedMoEImageProcessor(size={"height": 64, "width": 64})
    failures = []
    files = files_with_pixel_data()
    for path, is_image in files:
        try:
            processor.to_display(str(path))
            if args.verbose:
                print(f"  ok      {path.name}")
        except (ValueError, OSError) as error:
            failures.append((path.name, is_image, str(error).splitlines()[0][:110]))
    for name, is_image, reason in failures:
        print(f"  failed  {name}{'' if is_image else ' (no Rows, Columns or Bits Allocated)'}: {reason}")
    images = sum(is_image for _, is_image in files)
    decoded = len(files) - len(failures)
    decoded_images = images - sum(is_image for _, is_image, _ in failures)
    print(
        f"Decoded {decoded} of {len(files)} bundled DICOM files with pixel data ({decoded / len(files):.1%}); "
        f"{decoded_images} of the {images} whose header describes an image ({decoded_images / images:.1%})."
    )
    summary = {
        "dicom_files_with_pixel_data": len(files),
        "decoded": decoded,
        "decoded_share": decoded / len(files),
        "dicom_images": images,
        "decoded_images_share": decoded_images / images,
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
