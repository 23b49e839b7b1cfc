"""Image-report streams for training and evaluation.

Sources: the built-in `synthetic` phantoms, a Hub dataset id or local dataset folder (`load_dataset`), or globs of
parquet, webdataset `.tar`, jsonl/csv (with an image-path column) files or an imagefolder with metadata. Loading
always streams. Rows are decoded, checked and transformed in DataLoader workers and grouped into fixed-size
batches there; a row that cannot be used is skipped and counted by reason, and the counts travel with the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from modeling_medmoe import MedMoEProcessor
from modeling_medmoe.dicom import DicomPixels, is_dicom, read_dicom
from modeling_medmoe.limits import InputLimits, InputTooLarge

from .report_types import report_type_index, type_name_to_index
from .synthetic import EVAL_SEED, TRAIN_SEED, synthetic_stream
from .text_augmentation import SentenceSampler

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "image_path", "path", "file_name", "filename")
TEXT_COLUMN_CANDIDATES = ("text", "report", "caption", "findings", "impression", "txt", "sentence", "description")
EVAL_SPLIT_CANDIDATES = ("validation", "eval", "valid", "val", "test")
FILE_BUILDERS = {".parquet": "parquet", ".tar": "webdataset", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def help_field(default, help: str, **metadata):
    """A dataclass field whose help text HfArgumentParser shows (`--help`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DataArguments:
    """Where the rows come from, which columns hold what, and how they are read and batched for evaluation: the
    data flags of pretraining, fine-tuning and evaluation (HfArgumentParser makes one flag of each field)."""

    dataset_name: str = help_field(SYNTHETIC, "synthetic, a Hub dataset id, or a local dataset or save_to_disk folder")
    train_files: str | None = help_field(None, "glob of parquet / webdataset .tar / jsonl / csv files, or imagefolder")
    eval_files: str | None = help_field(None, "glob for the evaluation rows (same formats)")
    train_split: str = help_field("train", "the split of --dataset_name to train on")
    eval_split: str | None = help_field(None, "default: the first of validation, eval, valid, val, test")
    image_column: str | None = help_field(None, "default: detected (an Image feature or a usual name)")
    text_column: str | None = help_field(None, "default: detected (text, report, caption, findings, ...)")
    report_type_column: str | None = help_field(None, "column naming the modality; default: read from the report text")
    dataset_card_name: str | None = help_field(
        None,
        "how model cards, args.json and results name local data (default: 'local dataset': no folder or file name "
        "of it is written); synthetic and Hub ids are named as themselves",
    )
    max_length: int | None = help_field(128, "report length in tokens")
    per_device_eval_batch_size: int = help_field(64, "rows per evaluation batch")
    max_eval_samples: int | None = help_field(384, "evaluate the first N eval rows (they are the retrieval pool)")
    shuffle_buffer: int = help_field(1000, "rows the training stream is shuffled within")
    num_workers: int = help_field(2, "DataLoader workers per process (decode + transforms)")
    synthetic_rows_per_shard: int = help_field(2000, "rows per shard of the synthetic stream")
    synthetic_shards: int = help_field(8, "shards of the synthetic stream")
    synthetic_image_size: int = help_field(128, "side of the synthetic phantoms in pixels")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataArguments":
        """The data arguments among a script's parsed arguments."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names})


def open_stream(options: DataArguments, which: str) -> tuple[datasets.IterableDataset, str, str]:
    """The train or eval stream with its image and text columns (given or detected)."""
    stream = load_stream(options, which)
    image_column = detect_column(stream, options.image_column, "image")
    text_column = detect_column(stream, options.text_column, "text")
    return stream, image_column, text_column


def files_stream(pattern: str) -> datasets.IterableDataset:
    """A stream over files matching `pattern` (parquet, webdataset .tar, jsonl/json, csv) or an imagefolder."""
    if os.path.isdir(pattern):
        return datasets.load_dataset("imagefolder", data_dir=pattern, split="train", streaming=True)
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise FileNotFoundError(f"No files match {pattern!r}.")
    extensions = {os.path.splitext(path)[1].lower() for path in paths}
    builders = {FILE_BUILDERS.get(extension) for extension in extensions}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"{pattern!r} matches files of types {sorted(extensions)}; use one of {sorted(FILE_BUILDERS)} per glob, "
            "or a folder (imagefolder with metadata)."
        )
    builder = builders.pop()
    stream = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True)
    if builder in ("json", "csv"):
        stream = stream.map(_resolve_image_paths, fn_kwargs={"base": os.path.dirname(os.path.abspath(paths[0]))})
    return stream


def _resolve_image_paths(row: dict, base: str) -> dict:
    """jsonl/csv image paths are relative to the folder of the data files."""
    for column in IMAGE_COLUMN_CANDIDATES:
        value = row.get(column)
        if isinstance(value, str) and value and not os.path.isabs(value):
            row[column] = os.path.join(base, value)
    return row


class NoSuchSplit(ValueError):
    """The dataset has no split of the kind asked for (and none was named)."""


SAVED_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes for a Dataset, a DatasetDict


def hub_or_folder_stream(name: str, split: str | None, wanted: str) -> datasets.IterableDataset:
    """`load_dataset(name, streaming=True)` (or, for a folder written by `save_to_disk`, `load_from_disk`) and pick
    `split` (or, for evaluation, the first eval-like split; a saved Dataset is the split "train"). In a local folder
    of jsonl/csv files, relative image paths are relative to the data file's folder (as with --train_files)."""
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, marker)) for marker in SAVED_TO_DISK_MARKERS):
        saved = datasets.load_from_disk(name)
        saved_splits = {"train": saved} if isinstance(saved, datasets.Dataset) else dict(saved)
        splits = {key: value.to_iterable_dataset() for key, value in saved_splits.items()}
    else:
        splits = datasets.load_dataset(name, streaming=True)
    if split is None:
        candidates = EVAL_SPLIT_CANDIDATES if wanted == "eval" else ("train",)
        split = next((candidate for candidate in candidates if candidate in splits), None)
        if split is None:
            raise NoSuchSplit(f"{name!r} has splits {sorted(splits)}; pass --{wanted}_split or --{wanted}_files.")
    if split not in splits:
        raise ValueError(f"{name!r} has splits {sorted(splits)}; no {split!r}.")
    stream = splits[split]
    if os.path.isdir(name):
        files = datasets.load_dataset_builder(name).config.data_files.get(split) or []
        if files and FILE_BUILDERS.get(os.path.splitext(str(files[0]))[1].lower()) in ("json", "csv"):
            stream = stream.map(_resolve_image_paths, fn_kwargs={"base": os.path.dirname(str(files[0]))})
    return stream


def load_stream(options: DataArguments, which: str) -> datasets.IterableDataset:
    """The train or eval stream (`which` is "train" or "eval")."""
    files = options.train_files if which == "train" else options.eval_files
    if files:
        return files_stream(files)
    if options.dataset_name == SYNTHETIC:
        return synthetic_stream(
            seed=TRAIN_SEED if which == "train" else EVAL_SEED,
            num_shards=options.synthetic_shards,
            rows_per_shard=options.synthetic_rows_per_shard,
            image_size=options.synthetic_image_size,
        )
    split = options.train_split if which == "train" else options.eval_split
    return hub_or_folder_stream(options.dataset_name, split, which)


def stream_columns(stream: datasets.IterableDataset) -> dict:
    """Column name -> feature type (None where the stream does not declare types, e.g. jsonl: then the first row
    is read for the names)."""
    if stream.features is not None:
        return dict(stream.features)
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise ValueError("The stream has no rows.")
    return dict.fromkeys(first)


def detect_column(stream: datasets.IterableDataset, given: str | None, kind: str) -> str:
    """The image or text column: the one given, else the first Image feature or a usual name."""
    columns = stream_columns(stream)
    if given is not None:
        if given not in columns:
            raise ValueError(f"--{kind}_column {given!r} is not a column; the stream has {list(columns)}.")
        return given
    if kind == "image":
        typed = [name for name, feature in columns.items() if isinstance(feature, datasets.Image)]
        if typed:
            return typed[0]
    for candidate in IMAGE_COLUMN_CANDIDATES if kind == "image" else TEXT_COLUMN_CANDIDATES:
        for name in columns:
            if name.lower() == candidate:
                return name
    raise ValueError(f"Cannot tell which column holds the {kind}s among {list(columns)}; pass --{kind}_column.")


class SkipRow(Exception):
    """A row that cannot be used; `reason` names why (it becomes a counter key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RowPreparer:
    """Turns a stream row into a model-ready sample, or raises SkipRow.

    A sample holds `pixel_values` [3, H, W], `text`, `report_type_label` and the row's ground-truth columns
    (`metadata`, e.g. modality or finding box) for evaluation.
    """

    processor: MedMoEProcessor
    expert_names: list[str]
    image_column: str
    text_column: str
    report_type_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    max_report_characters: int = InputLimits.max_text_characters
    max_image_pixels: int = InputLimits.max_image_pixels

    def __call__(self, row: dict) -> dict:
        text = self.read_text(row)
        image = self.read_image(row)
        try:
            pixel_values = self.processor.image_processor.to_model_input(image)
        except ValueError as error:
            raise SkipRow("unusable_image", str(error)) from error
        if self.report_type_column is not None:
            label = type_name_to_index(row.get(self.report_type_column), self.expert_names)
        else:
            label = report_type_index(text, self.expert_names)
        metadata = {column: row.get(column) for column in self.metadata_columns}
        return {"pixel_values": pixel_values, "text": text, "report_type_label": label, "metadata": metadata}

    def read_text(self, row: dict) -> str:
        if self.text_column not in row or row[self.text_column] is None:
            raise SkipRow("missing_text")
        text = row[self.text_column]
        if not isinstance(text, str):
            raise SkipRow("text_not_a_string", type(text).__name__)
        if not text.strip():
            raise SkipRow("empty_report")
        if len(text) > self.max_report_characters:
            raise SkipRow("overlong_report", f"{len(text)} characters")
        return text.strip()

    def read_image(self, row: dict) -> Image.Image | DicomPixels:
        """Decode the image cell (PIL, {"bytes", "path"}, bytes or a path; an image or a DICOM file) and check its
        size before decoding."""
        value = row.get(self.image_column)
        if isinstance(value, dict):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if value is None:
            raise SkipRow("missing_image")
        if isinstance(value, (bytes, bytearray, str)) and is_dicom(value):
            return self.read_dicom(value)
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, str)):
            if len(value) == 0:
                raise SkipRow("empty_image_bytes" if isinstance(value, (bytes, bytearray)) else "missing_image")
            if isinstance(value, str) and not os.path.isfile(value):
                raise SkipRow("missing_image_file", value)
            try:
                image = Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise SkipRow("undecodable_image", str(error)) from error
        else:
            raise SkipRow("unsupported_image_value", type(value).__name__)
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise SkipRow("too_many_pixels", f"{width}x{height}")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise SkipRow("undecodable_image", str(error)) from error
        return image

    def read_dicom(self, value: bytes | str) -> DicomPixels:
        """A DICOM cell (the file's bytes or path) -> its pixels, or SkipRow with the reader's reason (the size is
        checked from the header)."""
        try:
            return read_dicom(value, limits=InputLimits(max_image_pixels=self.max_image_pixels))
        except InputTooLarge as error:  # the header's frame size or frame count, before decoding
            raise SkipRow("too_many_pixels", str(error)) from error
        except ValueError as error:
            raise SkipRow("undecodable_dicom", str(error)) from error


@dataclass
class BatchCollator:
    """Samples -> batch: tokenised reports with word ids, stacked pixels, report-type labels, metadata lists."""

    processor: MedMoEProcessor
    max_length: int = 128

    def __call__(self, samples: list[dict], skipped: Counter | None = None) -> dict:
        text = self.processor.tokenize(
            [sample["text"] for sample in samples],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        batch = dict(text)
        batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in samples])
        batch["report_type_labels"] = torch.tensor([sample["report_type_label"] for sample in samples])
        batch["texts"] = [sample["text"] for sample in samples]
        batch["metadata"] = {key: [sample["metadata"][key] for sample in samples] for key in samples[0]["metadata"]}
        batch["skipped"] = dict(skipped or {})
        return batch


@dataclass
class BatchStream(torch.utils.data.IterableDataset):
    """Reads rows from a (node-split) stream inside each DataLoader worker, prepares them, and yields fixed-size
    batches; `batch["skipped"]` counts the rows dropped (by reason) since the previous batch.

    Use with `DataLoader(batch_stream, batch_size=None, num_workers=...)`; datasets shards the stream across the
    workers. A last partial batch is dropped when `drop_last` (training: every process must see equal batches).
    `sample_sentences` (training) replaces some reports by one of their sentences.
    """

    stream: datasets.IterableDataset
    prepare: RowPreparer
    collate: BatchCollator
    batch_size: int
    drop_last: bool = True
    sample_sentences: SentenceSampler | None = None

    def __post_init__(self):
        super().__init__()

    def __iter__(self) -> Iterator[dict]:
        samples, skipped = [], Counter()
        if self.sample_sentences is not None:
            worker = torch.utils.data.get_worker_info()
            rng = self.sample_sentences.rng_for(self.stream.epoch, worker.id if worker else 0)
        for row in self.stream:
            try:
                sample = self.prepare(row)
            except SkipRow as skip:
                skipped[skip.reason] += 1
                continue
            if self.sample_sentences is not None:
                sample["text"] = self.sample_sentences(sample["text"], rng)
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self.collate(samples, skipped)
                samples, skipped = [], Counter()
        if samples and not self.drop_last:
            yield self.collate(samples, skipped)
        elif skipped or samples:
            skipped["incomplete_last_batch"] += len(samples)
            yield {"skipped": dict(skipped)}


class NoUsableBatch(RuntimeError):
    """A full pass over the training stream gave no batch to train on; the message gives the skip counts."""


def batches_forever(loader: torch.utils.data.DataLoader, progress) -> Iterator[dict]:
    """Batches of a training loader (`build_loader(training=True)`), epoch after epoch, each epoch a new shuffle.

    `progress` has `epoch` and `batches_in_epoch` (a `TrainingProgress`): after a resume the batches the run had
    already used are passed over. Batches without pixels carry only skip counts (`batch["skipped"]`). A pass that
    gives no usable batch raises `NoUsableBatch` with the rows skipped by reason, instead of reading the stream
    again forever."""
    batch_size = loader.dataset.batch_size
    while True:
        loader.dataset.stream.set_epoch(progress.epoch)
        already_used, usable, skipped = progress.batches_in_epoch, 0, Counter()
        for index, batch in enumerate(loader):
            usable += "pixel_values" in batch
            skipped.update(batch["skipped"])
            if index < already_used:
                continue
            progress.batches_in_epoch += 1
            yield batch
        if usable == 0:
            raise NoUsableBatch(no_usable_batch_message(skipped, batch_size))
        progress.epoch += 1
        progress.batches_in_epoch = 0


def no_usable_batch_message(skipped: Counter, batch_size: int) -> str:
    counts = ", ".join(f"{reason} {count}" for reason, count in skipped.most_common()) or "none (the stream is empty)"
    message = f"The training stream gave no usable batch of {batch_size} in a full pass; rows skipped: {counts}."
    if skipped.get("incomplete_last_batch"):
        message += (
            f" The {skipped['incomplete_last_batch']} usable row(s) make less than one batch per process (every "
            "process trains on full batches): lower --per_device_train_batch_size or add rows."
        )
    if set(skipped) - {"incomplete_last_batch"}:
        message += " Other rows could not be used: check the data flags (columns, image paths) and the data."
    return message


def prepare_stream(
    stream: datasets.IterableDataset,
    *,
    image_column: str,
    process_index: int = 0,
    num_processes: int = 1,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1000,
    max_rows: int | None = None,
) -> datasets.IterableDataset:
    """Keep images undecoded (decoded and checked per row later), split across processes, optionally shuffle,
    optionally keep only the first `max_rows` rows."""
    features = stream.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    if num_processes > 1:
        stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
    if max_rows is not None:
        stream = stream.take(max_rows)
    return stream


def make_dataloader(batch_stream: BatchStream, num_workers: int, in_order: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ready-made batches; no more workers than the stream has shards. It has a generator of its
    own, so starting an epoch draws nothing from the global RNG (a resumed run replays the same dropout).

    in_order (evaluation): the rows in the stream's order, so that `prepare_stream(max_rows=N)` keeps the first N
    rows whatever `num_workers` says (several workers would each read, and each take from, their own shards). One
    worker then decodes off the main process.
    """
    shards = batch_stream.stream.num_shards
    workers = max(0, min(num_workers, shards))
    if in_order:
        workers = min(workers, 1)
    return torch.utils.data.DataLoader(
        batch_stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def build_loader(
    stream: datasets.IterableDataset,
    processor: MedMoEProcessor,
    *,
    image_column: str,
    text_column: str,
    batch_size: int,
    training: bool,
    expert_names: list[str] | tuple[str, ...] = (),
    report_type_column: str | None = None,
    metadata_columns: tuple[str, ...] = (),
    max_length: int = 128,
    num_workers: int = 2,
    process_index: int = 0,
    num_processes: int = 1,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1000,
    max_rows: int | None = None,
    sentence_sampling: float = 0.0,
) -> torch.utils.data.DataLoader:
    """The one way a stream becomes batches, for every script and benchmark.

    Training (`training=True`): this process's part of the stream, shuffled when `shuffle_seed` is given, full
    batches only, a `sentence_sampling` share of the reports replaced by one of their sentences
    (`SentenceSampler`). Evaluation: the first `max_rows` rows in stream order, every row, whole reports.
    `metadata_columns` that the stream has are kept in `batch["metadata"]`.
    """
    prepared = prepare_stream(
        stream,
        image_column=image_column,
        process_index=process_index,
        num_processes=num_processes,
        shuffle_seed=shuffle_seed if training else None,
        shuffle_buffer=shuffle_buffer,
        max_rows=max_rows,
    )
    columns = stream_columns(stream) if metadata_columns else {}
    present = tuple(dict.fromkeys(column for column in metadata_columns if column in columns))
    prepare = RowPreparer(processor, list(expert_names), image_column, text_column, report_type_column, present)
    sampler = SentenceSampler(sentence_sampling, (shuffle_seed or 0) + process_index)  # checks the share
    batches = BatchStream(
        prepared,
        prepare,
        BatchCollator(processor, max_length),
        batch_size,
        drop_last=training,
        sample_sentences=sampler if training and sentence_sampling > 0 else None,
    )
    return make_dataloader(batches, num_workers, in_order=not training)


@dataclass
class LoaderSettings:
    """What a training script's loaders take from its training arguments: batch size, shuffle seed, and the share of
    reports cut to one sentence."""

    train_batch_size: int
    seed: int
    sentence_sampling: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoaderSettings":
        """The settings from a training script's --per_device_train_batch_size, --seed and --sentence_sampling."""
        return cls(args.per_device_train_batch_size, args.seed, args.sentence_sampling)


def script_loaders(
    options: DataArguments,
    settings: LoaderSettings,
    processor: MedMoEProcessor,
    train_stream: datasets.IterableDataset,
    image_column: str,
    text_column: str,
    expert_names: list[str],
    process_index: int = 0,
    num_processes: int = 1,
    metadata_columns: tuple[str, ...] = (),
):
    """(train loader, held-out loader) of a training script: this process's part of the train stream, shuffled
    with the settings' seed, in training batches; the first `max_eval_samples` eval rows in eval batches, or None
    for train files without eval files and for a dataset without an eval-like split."""
    shared = {
        "image_column": image_column,
        "text_column": text_column,
        "expert_names": expert_names,
        "report_type_column": options.report_type_column,
        "metadata_columns": metadata_columns,
        "max_length": options.max_length,
        "num_workers": options.num_workers,
    }
    train_loader = build_loader(
        train_stream,
        processor,
        batch_size=settings.train_batch_size,
        training=True,
        process_index=process_index,
        num_processes=num_processes,
        shuffle_seed=settings.seed,
        shuffle_buffer=options.shuffle_buffer,
        sentence_sampling=settings.sentence_sampling,
        **shared,
    )
    if options.train_files and not options.eval_files:
        return train_loader, None
    try:
        eval_stream = load_stream(options, "eval")
    except NoSuchSplit as missing:
        if process_index == 0:
            logger.info(f"No held-out evaluation: {missing}")
        return train_loader, None
    eval_loader = build_loader(
        eval_stream, processor, batch_size=options.per_device_eval_batch_size, training=False,
        max_rows=options.max_eval_samples, **shared,
    )  # fmt: skip
    return train_loader, eval_loader
