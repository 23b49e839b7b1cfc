"""Every stream source gives the same prepared batches: parquet, webdataset, jsonl/csv with image paths,
imagefolder with metadata, a local dataset folder; columns are detected; processes get disjoint rows."""

import io
import json
import tarfile

import datasets
import pytest
import torch

from medmoe.training import data
from medmoe.training.synthetic import synthetic_stream

ROWS = 12


@pytest.fixture(scope="module")
def phantoms():
    return list(synthetic_stream(num_shards=2, rows_per_shard=ROWS // 2, image_size=48))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(rows, path):
    table = datasets.Dataset.from_list(
        [
            {
                "image": {"bytes": png_bytes(row["image"]), "path": None},
                "caption": row["text"],
                "modality": row["modality"],
            }
            for row in rows
        ],
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "modality": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(path))


def write_image_files(rows, folder):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, row in enumerate(rows):
        name = f"img_{index}.png"
        row["image"].save(folder / name)
        names.append(name)
    return names


def write_source(kind, rows, root):
    """Write `rows` in the format `kind` under `root`; return the --train_files value."""
    if kind == "parquet":
        write_parquet(rows[: ROWS // 2], root / "part-0.parquet")
        write_parquet(rows[ROWS // 2 :], root / "part-1.parquet")
        return str(root / "*.parquet")
    if kind == "webdataset":
        with tarfile.open(root / "shard-0.tar", "w") as archive:
            for index, row in enumerate(rows):
                for extension, payload in (("png", png_bytes(row["image"])), ("txt", row["text"].encode())):
                    info = tarfile.TarInfo(f"sample{index:04d}.{extension}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
        return str(root / "*.tar")
    if kind in ("jsonl", "csv"):
        names = write_image_files(rows, root / "images")
        if kind == "jsonl":
            lines = [json.dumps({"file_name": f"images/{n}", "report": r["text"]}) for n, r in zip(names, rows)]
            (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
            return str(root / "pairs.jsonl")
        lines = ["image_path,report"] + [f'images/{n},"{r["text"]}"' for n, r in zip(names, rows)]
        (root / "pairs.csv").write_text("\n".join(lines) + "\n")
        return str(root / "pairs.csv")
    if kind == "imagefolder":
        names = write_image_files(rows, root / "folder")
        lines = [json.dumps({"file_name": n, "text": r["text"]}) for n, r in zip(names, rows)]
        (root / "folder" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return str(root / "folder")
    raise ValueError(kind)


def prepared_batches(stream, processor, config, batch_size=4, **kwargs):
    image_column = data.detect_column(stream, None, "image")
    text_column = data.detect_column(stream, None, "text")
    prepared = data.prepare_stream(stream, image_column=image_column, **kwargs)
    prepare = data.RowPreparer(processor, config.expert_names, image_column, text_column)
    batches = data.BatchStream(prepared, prepare, data.BatchCollator(processor), batch_size, drop_last=False)
    return list(data.make_dataloader(batches, num_workers=0))


@pytest.mark.parametrize("kind", ["parquet", "webdataset", "jsonl", "csv", "imagefolder"])
def test_each_file_source_streams_every_row(kind, phantoms, processor, nano_config, tmp_path):
    files = write_source(kind, phantoms, tmp_path)
    stream = data.load_stream(data.DataArguments(dataset_name="unused", train_files=files), "train")
    assert isinstance(stream, datasets.IterableDataset)
    batches = prepared_batches(stream, processor, nano_config)
    texts = [text for batch in batches for text in batch["texts"]]
    assert sorted(texts) == sorted(row["text"] for row in phantoms)
    first = batches[0]
    assert first["pixel_values"].shape == (4, 3, 64, 64)
    assert first["word_ids"].shape == first["input_ids"].shape
    expected_labels = [nano_config.expert_names.index(row["modality"]) for row in phantoms]
    assert sorted(torch.cat([b["report_type_labels"] for b in batches]).tolist()) == sorted(expected_labels)


def test_local_dataset_folder_with_splits(phantoms, processor, nano_config, tmp_path):
    (tmp_path / "data").mkdir()
    write_parquet(phantoms[:8], tmp_path / "data" / "train-0000.parquet")
    write_parquet(phantoms[8:], tmp_path / "data" / "validation-0000.parquet")
    options = data.DataArguments(dataset_name=str(tmp_path))
    train = data.load_stream(options, "train")
    evaluation = data.load_stream(options, "eval")
    assert len(list(train)) == 8 and len(list(evaluation)) == 4


def test_synthetic_source_and_report_type_column(processor, nano_config):
    stream = data.load_stream(data.DataArguments(synthetic_shards=2, synthetic_rows_per_shard=4), "eval")
    prepared = data.prepare_stream(stream, image_column="image")
    prepare = data.RowPreparer(
        processor,
        nano_config.expert_names,
        "image",
        "text",
        report_type_column="modality",
        metadata_columns=("modality", "finding_box"),
    )
    batch = next(iter(data.BatchStream(prepared, prepare, data.BatchCollator(processor), 8)))
    assert batch["report_type_labels"].tolist() == [
        nano_config.expert_names.index(m) for m in batch["metadata"]["modality"]
    ]
    assert len(batch["metadata"]["finding_box"][0]) == 4


def test_columns_are_detected_or_named():
    features = datasets.Features(
        {"jpg": datasets.Image(), "txt": datasets.Value("string"), "id": datasets.Value("int32")}
    )
    stream = datasets.Dataset.from_dict(
        {"jpg": [None], "txt": ["CT"], "id": [1]}, features=features
    ).to_iterable_dataset()
    assert data.detect_column(stream, None, "image") == "jpg"
    assert data.detect_column(stream, None, "text") == "txt"
    with pytest.raises(ValueError, match="not a column"):
        data.detect_column(stream, "report", "text")
    numbers = datasets.Dataset.from_dict({"x": [1]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="pass --text_column"):
        data.detect_column(numbers, None, "text")


def test_processes_read_disjoint_rows_that_cover_the_stream(phantoms, processor, nano_config, tmp_path):
    files = write_source("parquet", phantoms, tmp_path)
    texts_per_process = []
    for rank in range(2):
        stream = data.load_stream(data.DataArguments(train_files=files), "train")
        batches = prepared_batches(
            stream, processor, nano_config, process_index=rank, num_processes=2, shuffle_seed=3, shuffle_buffer=4
        )
        texts_per_process.append([text for batch in batches for text in batch["texts"]])
    assert not set(texts_per_process[0]) & set(texts_per_process[1])
    assert sorted(texts_per_process[0] + texts_per_process[1]) == sorted(row["text"] for row in phantoms)


def test_mixed_file_types_in_one_glob_are_refused(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.csv").write_text("x\n")
    with pytest.raises(ValueError, match="one of"):
        data.files_stream(str(tmp_path / "*"))
    with pytest.raises(FileNotFoundError):
        data.files_stream(str(tmp_path / "*.tar"))


def test_sentence_sampling_trains_on_single_sentences_and_keeps_the_reports_label(
    phantoms, processor, nano_config, tmp_path
):
    from medmoe.training.text_augmentation import SentenceSampler, split_sentences

    assert split_sentences("Chest X-ray, PA view.  No effusion; e.g. none. 3.5 cm nodule! Stable?") == [
        "Chest X-ray, PA view.",
        "No effusion; e.g. none.",
        "3.5 cm nodule!",
        "Stable?",
    ]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        SentenceSampler(1.5)
    reports = [{**row, "text": f"{row['text']} Finding {index} is stable. No other change."} for index, row in
               enumerate(phantoms)]  # fmt: skip
    write_parquet(reports, tmp_path / "reports.parquet")
    stream = data.load_stream(data.DataArguments(train_files=str(tmp_path / "reports.parquet")), "train")
    loader_kwargs = dict(
        image_column="image",
        text_column="caption",
        batch_size=ROWS,
        expert_names=nano_config.expert_names,
        num_workers=0,
    )
    whole = next(iter(data.build_loader(stream, processor, training=True, shuffle_seed=0, **loader_kwargs)))

    def sampled(probability, **kwargs):
        loader = data.build_loader(stream, processor, shuffle_seed=0, sentence_sampling=probability, **kwargs)
        return next(iter(loader))

    every = sampled(1.0, training=True, **loader_kwargs)
    for report, sentence in zip(whole["texts"], every["texts"]):
        assert sentence in split_sentences(report)
    assert torch.equal(every["report_type_labels"], whole["report_type_labels"])  # read from the whole report
    assert sampled(1.0, training=True, **loader_kwargs)["texts"] == every["texts"]  # seeded: a resume replays it
    assert sampled(1.0, training=False, **loader_kwargs)["texts"] != every["texts"]  # evaluation: whole reports
    half = sampled(0.5, training=True, **loader_kwargs)["texts"]
    assert 0 < sum(text in whole["texts"] for text in half) < len(half)
