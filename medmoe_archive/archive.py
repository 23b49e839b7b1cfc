"""An image archive embedded for search: where its rows come from, how they are embedded, and the folder an index
lives in (medmoe_archive/index.py builds it, medmoe_archive/search.py queries it).

    OUT/chunks/chunk-NNNNN.parquet   rows embedded so far, each chunk written atomically (kept for resuming)
    OUT/progress.json                source rows read so far and skipped rows by reason, written after each chunk
    OUT/skipped.jsonl                every skipped row: {"id", "path", "reason", "detail"}, one per line
    OUT/dataset/                     the finished `datasets` dataset (save_to_disk): id, path, embedding, expert,
                                     expert_index, thumbnail, and the source's metadata columns (for a folder: its
                                     sub-folder and the DICOM patient, study, series, instance, modality, body part,
                                     study date, series description and embedded frame)
    OUT/embedding.faiss              its FAISS index on `embedding` (inner product = cosine similarity: the
                                     embeddings are L2-normalised)
    OUT/index_info.json              the model, the source, rows, skipped rows, dimension, index type, experts
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import torch

from medmoe.training import data as data_module
from medmoe_archive.dicomweb import PacsSettings, add_pacs_arguments, dicomweb_rows, parse_qido_filters
from medmoe_archive.rows import DICOM_FIELDS, ArchiveRow
from medmoe_archive.vector_index import IndexPlan, StoredVectors
from modeling_medmoe.dicom import is_dicom_bytes, is_dicom_file
from modeling_medmoe.image_encoder import BACKENDS, ImageEncoder
from modeling_medmoe.limits import InputLimits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
FAISS_FILE = "embedding.faiss"
SKIPPED_FILE = "skipped.jsonl"
INFO_FILE = "index_info.json"


def entry_problem(path: Path) -> str | None:
    """Why a folder entry cannot be read as a file (None: a regular file, possibly through symlinks). Only
    metadata is read: a FIFO, socket or device is never opened (a read could block forever)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return "dangling_symlink"
    except OSError as error:
        return "symlink_loop" if error.errno == errno.ELOOP else "unreadable_entry"
    return None if stat.S_ISREG(status.st_mode) else "not_a_regular_file"


def folder_rows(folder: str | Path, all_frames: bool = False) -> Iterator[ArchiveRow]:
    """Every image file under `folder` (nested; by suffix, or DICOM files without one), in sorted order; id = the
    path relative to the folder, metadata `folder` = its sub-folder. Entries with an image suffix or none that are
    not readable regular files (dangling symlinks, symlink loops, FIFOs, unreadable folders) come as rows with a
    `problem`. A multi-frame DICOM is its middle frame, or with `all_frames` one row per frame (id PATH#frameN)."""
    root = Path(folder)
    unreadable_folders: list[OSError] = []
    for directory, subdirectories, files in os.walk(root, onerror=unreadable_folders.append):
        while unreadable_folders:
            error = unreadable_folders.pop()
            yield problem_row(root, Path(error.filename), "unreadable_folder")
        subdirectories.sort()
        for name in sorted(files):
            path = Path(directory) / name
            suffix = path.suffix.lower()
            if suffix and suffix not in IMAGE_SUFFIXES:
                continue
            problem = entry_problem(path)
            if problem is None and not suffix:
                try:
                    if not is_dicom_file(path):
                        continue
                except OSError:
                    problem = "unreadable_file"
            if problem is not None:
                yield problem_row(root, path, problem)
                continue
            relative = path.relative_to(root)
            metadata = {"folder": str(relative.parent), **dicom_metadata(path if is_dicom_file(path) else None)}
            if all_frames and metadata["frame"]:  # a multi-frame DICOM: its middle frame is past the first
                for frame in range(dicom_frame_count(path)):
                    row_id = f"{relative}#frame{frame}"
                    yield ArchiveRow(row_id, str(path), str(path.resolve()), {**metadata, "frame": frame})
                continue
            yield ArchiveRow(str(relative), str(path), str(path.resolve()), metadata)
    for error in unreadable_folders:
        yield problem_row(root, Path(error.filename), "unreadable_folder")


def problem_row(root: Path, path: Path, problem: str) -> ArchiveRow:
    relative = path.relative_to(root)
    metadata = {"folder": str(relative.parent), **dicom_metadata(None)}
    return ArchiveRow(str(relative), None, str(path), metadata, problem=problem)


def dicom_frame_count(path: Path) -> int:
    """The number of frames a DICOM file's header declares."""
    import pydicom

    from modeling_medmoe.dicom import frame_count

    return frame_count(pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size=1024))


def dicom_metadata(source) -> dict:
    """The study, series and patient fields of a DICOM file (path or bytes; its header only) as index columns, and
    `frame`, the frame that is embedded (the middle one); all None for another image or an unreadable header."""
    empty = {**dict.fromkeys(DICOM_FIELDS), "frame": None}
    if source is None or not (is_dicom_bytes(source) or isinstance(source, (str, Path))):
        return empty
    try:
        import pydicom

        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        header = pydicom.dcmread(handle, stop_before_pixels=True, force=True, defer_size=1024)
        fields = {column: header.get(keyword) for column, keyword in DICOM_FIELDS.items()}
        frames = int(header.get("NumberOfFrames") or 1)
    except Exception:  # noqa: BLE001 - a header that does not parse leaves the fields empty; decoding says why
        return empty
    return {**{column: None if value is None else str(value) for column, value in fields.items()},
            "frame": frames // 2}  # fmt: skip


@dataclass(frozen=True)
class ArchiveSource:
    """What an archive index is built from: a folder of image and DICOM files (`images`), file globs (`files`), a
    Hub dataset or local dataset folder (`dataset_name`, `split`; `image_column` and `id_column` for these two,
    default: detected, and the row number), or a PACS over DICOMweb (`dicomweb`: how to reach it, `qido` KEY=VALUE
    study filters)."""

    images: Path | None = None
    files: str | None = None
    dataset_name: str | None = None
    split: str = "train"
    image_column: str | None = None
    id_column: str | None = None
    dicomweb: PacsSettings | None = None
    qido: tuple[str, ...] = ()
    all_frames: bool = False

    @classmethod
    def from_args(cls, args, limits: InputLimits) -> "ArchiveSource":
        """The source `add_source_arguments`' flags name; a PACS instance may hold limits.max_image_bytes."""
        pacs = PacsSettings.from_arguments(args, limits.max_image_bytes) if args.dicomweb else None
        return cls(args.images, args.files, args.dataset_name, args.split, args.image_column, args.id_column,
                   pacs, tuple(args.qido), args.all_frames)  # fmt: skip

    def description(self) -> dict:
        if self.dicomweb:  # (the keys of a folder, files or dataset source stay as they were: earlier runs resume)
            return {"dicomweb": self.dicomweb.url, "qido": sorted(self.qido)}
        described = {
            "images": str(Path(self.images).resolve()) if self.images else None,
            "files": self.files,
            "dataset_name": self.dataset_name,
            "split": self.split if self.dataset_name else None,
            "image_column": self.image_column,
            "id_column": self.id_column,
        }
        return {**described, "all_frames": True} if self.all_frames else described

    def open(self) -> tuple[Iterator[ArchiveRow], dict]:
        """(rows, metadata features) of the archive."""
        if self.dicomweb:
            return dicomweb_rows(self.dicomweb, parse_qido_filters(self.qido)), metadata_features(None, "", None)
        if self.images is not None:
            if not Path(self.images).is_dir():
                raise FileNotFoundError(f"No folder at {self.images}.")
            return folder_rows(self.images, self.all_frames), metadata_features(None, "", None)
        if self.files:
            stream = data_module.files_stream(self.files)
        else:
            stream = data_module.hub_or_folder_stream(self.dataset_name, self.split, "train")
        image_column = data_module.detect_column(stream, self.image_column, "image")
        if isinstance((stream.features or {}).get(image_column), datasets.Image):
            stream = stream.cast_column(image_column, datasets.Image(decode=False))
        return stream_rows(stream, image_column, self.id_column), metadata_features(
            stream, image_column, self.id_column
        )


def add_source_arguments(parser) -> None:
    """The flags that name an archive and how its images are read, shared by medmoe-index and medmoe-classify
    (`ArchiveSource.from_args` reads them; --window is passed to the image processor)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of image and DICOM files (read recursively)")
    source.add_argument("--files", help="glob of parquet / webdataset .tar / jsonl / csv files, or an imagefolder")
    source.add_argument("--dataset_name", help="a Hub dataset id or a local dataset folder")
    source.add_argument("--dicomweb", help="a PACS's DICOMweb root, e.g. https://pacs/dicom-web (QIDO-RS, WADO-RS)")
    parser.add_argument("--split", default="train", help="the split of --dataset_name")
    parser.add_argument(
        "--qido", action="append", default=[], help="a QIDO-RS study filter of --dicomweb, KEY=VALUE (repeatable)"
    )
    parser.add_argument("--image_column", help="default: detected (an Image feature or a usual name)")
    parser.add_argument("--id_column", help="column naming each row (default: the row number; folders: the path)")
    parser.add_argument("--window", help="DICOM / 16-bit display window: a CT preset (lung, brain, ...) or C,W")
    parser.add_argument(
        "--all_frames",
        action="store_true",
        help="every frame of a multi-frame DICOM as its own row (default: its middle frame); --group series in "
        "medmoe-search gathers them",
    )
    add_pacs_arguments(parser)


DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # None: no autocast
MAX_DEFAULT_WORKERS = 8


def add_embedding_arguments(parser) -> None:
    """How images are decoded and embedded, shared by medmoe-index and medmoe-classify (`EmbeddingSettings`)."""
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (under several processes each uses its own GPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="autocast the model's image side to bfloat16 or float16 (GPUs; bfloat16 also on CPUs)",
    )
    parser.add_argument("--batch_size", type=int, help="images per forward pass (default: 32 on CPU, 128 on GPU)")
    parser.add_argument(
        "--num_workers",
        type=int,
        help="processes that read and decode images while the model embeds (default: this process's share of the "
        f"cores, at most {MAX_DEFAULT_WORKERS}; 0 = decode in the main process)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image side: torch, onnx (the folder's export, training/export.py), or auto (onnx when exported)",
    )


def cores_of_this_process() -> int:
    """The cores this process may use, shared with the other processes of an accelerate launch on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class EmbeddingSettings:
    """Where and how images are embedded: `device`, autocast `dtype`, `batch_size`, `num_workers` decoding
    processes, `backend` (medmoe_archive/decoding.py, modeling_medmoe.ImageEncoder)."""

    device: str
    dtype: str
    batch_size: int
    num_workers: int
    backend: str

    @classmethod
    def from_args(cls, args, share) -> "EmbeddingSettings":
        """`add_embedding_arguments`' flags with their defaults for this device and this rank (`share`)."""
        device = share.device(args.device)
        batch_size = args.batch_size or (128 if device.startswith("cuda") else 32)
        workers = (
            args.num_workers if args.num_workers is not None else min(cores_of_this_process(), MAX_DEFAULT_WORKERS)
        )
        if batch_size < 1 or workers < 0:
            raise ValueError("--batch_size must be at least 1 and --num_workers at least 0.")
        return cls(device, args.dtype, batch_size, workers, args.backend)

    def encoder(self, model, folder: str) -> ImageEncoder:
        return ImageEncoder.for_model(model, folder, self.backend, autocast_dtype=DTYPES[self.dtype])

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}, batch {self.batch_size}, {self.num_workers} decoding workers"


def stream_rows(stream: datasets.IterableDataset, image_column: str, id_column: str | None) -> Iterator[ArchiveRow]:
    """Rows of a `datasets` stream; id = the id column's value or the row number; metadata = the other scalar
    columns (text, labels, ...)."""
    for number, row in enumerate(stream):
        cell = row[image_column]
        path = cell.get("path") if isinstance(cell, dict) else None
        image = (cell.get("bytes") or path) if isinstance(cell, dict) else cell
        metadata = {
            key: value
            for key, value in row.items()
            if key not in (image_column, id_column) and isinstance(value, (str, int, float, bool, type(None)))
        }
        identifier = str(row[id_column]) if id_column else f"row-{number:09d}"
        yield ArchiveRow(identifier, image, path if path and os.path.isfile(path) else None, metadata)


def metadata_features(stream: datasets.IterableDataset | None, image_column: str, id_column: str | None) -> dict:
    """The metadata columns' features: the stream's declared scalar features, or for a folder `folder` and the DICOM
    fields (DICOM_FIELDS and `frame`)."""
    if stream is None:
        dicom = {column: datasets.Value("string") for column in DICOM_FIELDS}
        return {"folder": datasets.Value("string"), **dicom, "frame": datasets.Value("int32")}
    declared = stream.features or {}
    return {
        name: feature
        for name, feature in declared.items()
        if name not in (image_column, id_column) and isinstance(feature, datasets.Value)
    }


def index_features(metadata: dict, dimension: int) -> datasets.Features:
    """The schema of every chunk and of the finished dataset."""
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "path": datasets.Value("string"),
            "embedding": datasets.Sequence(datasets.Value("float32"), length=dimension),
            "expert": datasets.Value("string"),
            "expert_index": datasets.Value("int32"),
            "thumbnail": datasets.Value("binary"),
            **metadata,
        }
    )


def embed_images(encoder: ImageEncoder, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised image embeddings [B, P], chosen experts [B]) of pixel_values [B, 3, H, W], what an index
    stores (inner product = cosine similarity)."""
    embeddings, experts = encoder(pixel_values)
    return torch.nn.functional.normalize(embeddings, dim=-1), experts


@torch.no_grad()
def embed_query_text(model, tokenizer, text: str) -> torch.Tensor:
    """A text query -> its L2-normalised embedding [P] (the same text tower as the archive's reports)."""
    encoding = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
    out = model(
        input_ids=encoding["input_ids"].to(model.device), attention_mask=encoding["attention_mask"].to(model.device)
    )
    return out.text_embeds[0].float().cpu()


def read_json(path: Path) -> dict | None:
    """A JSON file's content, None when there is no file."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomically(path: Path, value) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def columns_with_values(dataset: datasets.Dataset, columns: tuple[str, ...]) -> dict[str, bool]:
    """Which of `columns` the dataset holds and has at least one value in."""
    return {
        column: column in dataset.column_names and dataset.data.column(column).null_count < len(dataset)
        for column in columns
    }


@dataclass
class LoadedIndex:
    """A finished index folder: the dataset (memory-mapped), its stored vectors, the FAISS index and its plan."""

    dataset: datasets.Dataset
    info: dict
    plan: IndexPlan
    faiss_index: object
    vectors: StoredVectors

    def nearest(self, query: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
        """(scores, row numbers) of the k rows most similar to `query` [P], best first."""
        scores, rows = self.plan.search(self.faiss_index, self.vectors, query.numpy(), k)
        return scores.tolist(), rows.tolist()


def load_index(index_dir: Path, nprobe: int | None = None) -> LoadedIndex:
    """The finished dataset and its FAISS index (searching `nprobe` lists when given, else the plan's)."""
    info = read_json(index_dir / INFO_FILE)
    if info is None or not (index_dir / FAISS_FILE).is_file():
        raise FileNotFoundError(
            f"{index_dir} holds no finished index (no {INFO_FILE} / {FAISS_FILE}); run medmoe-index."
        )
    plan = IndexPlan.from_info(info)
    if nprobe is not None:
        plan = replace(plan, nprobe=nprobe)
    dataset = datasets.load_from_disk(str(index_dir / "dataset"))
    return LoadedIndex(dataset, info, plan, plan.load(index_dir / FAISS_FILE), StoredVectors(dataset))
