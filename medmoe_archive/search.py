"""Search an archive indexed by medmoe-index with a text query or an example image.

    medmoe-search --index outputs/archive-index --text "axial CT with a hypodense liver lesion" --k 10
    medmoe-search --index outputs/archive-index --image query.dcm --window lung --expert CT --contact_sheet hits.png
    medmoe-search --index outputs/archive-index --text "pulmonary nodule" --modality CT --group series

Prints the top-k rows (rank, cosine similarity, id, the expert that embedded the image, path) and, with
--contact_sheet, writes a PNG grid of the hits, readable by the user alone. The model is the one the index was built
with (index_info.json), unless --model names another with the same embedding space. --expert keeps only images
routed to that expert; --modality, --study and --patient filter on the DICOM tags the index stores (--modality CT:
the file's own Modality tag, not the router's guess); --group series|study answers with the best image of each
series or study and how many of its images matched, or, with --pool mean, scores each series or study by its pooled
embedding (the mean of its images' embeddings: the frames of a multi-frame file indexed with --all_frames, the slices
of a series).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from medmoe_archive import archive
from medmoe_archive.deidentify import private_files, private_permissions
from modeling_medmoe import MedMoEImageProcessor
from modeling_medmoe.image_encoder import ImageEncoder


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def printable(text) -> str:
    """`text` on one terminal line: control characters (a newline in a file name) shown as escapes."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in str(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, type=Path, help="the folder medmoe-index wrote")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query (a report-like sentence works best)")
    query.add_argument("--image", help="an example image or DICOM file")
    parser.add_argument("--k", type=positive_int, default=10, help="how many rows to return")
    parser.add_argument("--expert", help="only images routed to this expert (one of the model's expert names)")
    parser.add_argument("--modality", help="only DICOM images whose Modality tag is this (CT, MR, CR, US, ...)")
    parser.add_argument("--study", help="only the DICOM study with this StudyInstanceUID")
    parser.add_argument("--patient", help="only the DICOM images of this PatientID")
    parser.add_argument(
        "--group",
        choices=("series", "study"),
        help="one answer per series or study: its best image and how many matched",
    )
    parser.add_argument(
        "--pool",
        choices=("best", "mean"),
        default="best",
        help="with --group: score a series or study by its best image, or by the mean of its images' embeddings",
    )
    parser.add_argument("--window", help="DICOM window of the query image: a CT preset or C,W")
    parser.add_argument("--contact_sheet", type=Path, help="write a PNG grid of the hits here")
    parser.add_argument("--json", action="store_true", help="print the hits as JSON instead of a table")
    parser.add_argument("--model", help="default: the model the index was built with")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--nprobe", type=positive_int, help="inverted lists searched (ivf, ivfpq; default: the index's own setting)"
    )
    args = parser.parse_args(argv)
    if args.pool == "mean" and not args.group:
        parser.error("--pool mean pools the images of a series or study: add --group series or --group study")
    return args


class ArchiveSearch:
    """An index folder, its model and processor: queries in, ranked rows out."""

    def __init__(self, index_dir: Path, model_name: str | None = None, device: str = "cpu", nprobe: int | None = None):
        self.index = archive.load_index(index_dir, nprobe)
        self.dataset, self.info = self.index.dataset, self.index.info
        self.shown = self.dataset.remove_columns("embedding")  # what a hit carries
        model_name = model_name or self.info["model"]
        self.model = AutoModel.from_pretrained(model_name, trust_remote_code=True).to(device).eval()
        self.image_processor = MedMoEImageProcessor.from_pretrained(model_name)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
        self.image_encoder = ImageEncoder.for_model(self.model, model_name, "torch")
        if self.model.config.projection_dim != self.info["dimension"]:
            raise ValueError(f"{model_name} embeds in {self.model.config.projection_dim} dimensions; the index holds "
                             f"{self.info['dimension']}.")  # fmt: skip

    def text_query(self, text: str) -> torch.Tensor:
        if not text.strip():
            raise ValueError("The text query is empty; describe the images to find.")
        return archive.embed_query_text(self.model, self.tokenizer, text)

    def image_query(self, image, window=None) -> torch.Tensor:
        pixel_values = self.image_processor(images=[image], window=window)["pixel_values"]
        return archive.embed_images(self.image_encoder, pixel_values)[0][0]

    def search(
        self, query: torch.Tensor, k: int, expert: str | None = None, where: dict | None = None,
        group: str | None = None, pool: str = "best", within: dict | None = None,
    ) -> list[dict]:  # fmt: skip
        """The k rows most similar to `query` [P] (cosine), best first, optionally only those routed to `expert`,
        those whose columns equal `where`'s values (e.g. {"modality": "CT"}, the DICOM tag) and those whose columns
        lie in `within`'s (low, high) ranges, bounds included, either open when None (e.g. {"study_date":
        ("20260101", None)}). With `group` (a column such as series_uid), the k best groups instead: each its best
        row, with `matches`, how many of its rows were among the hits (pool="best"), or scored by the group's pooled
        embedding, with `matches` the rows pooled (pool="mean", see `pooled_groups`). Each hit is the row (without
        its embedding) with `score`, `rank` and `row`, its number in the dataset."""
        if expert is not None and expert not in self.info["expert_names"]:
            raise ValueError(f"Unknown expert {expert!r}; the model's experts are {self.info['expert_names']}.")
        where = {**(where or {}), **({"expert": expert} if expert is not None else {})}
        keep = RowFilter(where, within or {})
        for column in [*keep.columns, *([group] if group else [])]:
            if column not in self.dataset.column_names:
                raise ValueError(f"The index has no column {column!r}; it has {self.dataset.column_names}.")
        if group and pool == "mean":
            return pooled_groups(self.dataset, query, k, group, keep)
        total = len(self.dataset)
        wanted = min(k if not keep.columns and not group else 4 * k, total)
        while True:  # with a filter or groups, widen the search until k answers or the archive is exhausted
            scores, rows = self.index.nearest(query, wanted)
            found = self.shown[rows] if rows else {}
            hits = [
                {"score": score, "row": row, **{key: found[key][position] for key in found}}
                for position, (score, row) in enumerate(zip(scores, rows))
            ]
            hits = [hit for hit in hits if keep(hit)]
            if group:
                hits = best_per_group(hits, group)
            if len(hits) >= k or wanted >= total:
                return [{"rank": rank, **hit} for rank, hit in enumerate(hits[:k], start=1)]
            wanted = min(2 * wanted, total)


class RowFilter:
    """Which rows a search keeps: columns equal to `where`'s values and within `within`'s (low, high) ranges."""

    def __init__(self, where: dict, within: dict):
        self.where, self.within = where, within
        self.columns = sorted({*where, *within})

    def __call__(self, row: dict) -> bool:
        if any(row[column] != value for column, value in self.where.items()):
            return False
        for column, (low, high) in self.within.items():
            value = row[column]
            if value is None or (low is not None and value < low) or (high is not None and value > high):
                return False
        return True


def pooled_groups(dataset, query: torch.Tensor, k: int, group: str, keep: RowFilter) -> list[dict]:
    """The k values of `group` (a column such as series_uid) whose pooled embedding, the mean of their rows' unit
    embeddings made unit again, is most similar to `query` [P], best first: each answered with its row most similar
    to the query, `score` the pooled similarity and `matches` the number of rows pooled. Only rows `keep` keeps take
    part; rows without a `group` value (not DICOM) are left out."""
    columns = {column: dataset[column] for column in {group, *keep.columns}}
    members: dict = {}
    for row, key in enumerate(columns[group]):
        if key is not None and keep({column: values[row] for column, values in columns.items()}):
            members.setdefault(key, []).append(row)
    if not members:
        return []
    embeddings = dataset.with_format("numpy")
    query_vector = query.numpy().astype(np.float32)
    scored = []
    for key, rows in members.items():
        vectors = np.stack(embeddings[rows]["embedding"]).astype(np.float32)  # [N, P], unit rows
        pooled = vectors.mean(axis=0)
        similarities = vectors @ query_vector
        score = float(pooled @ query_vector / max(np.linalg.norm(pooled), 1e-12))
        scored.append((score, rows[int(similarities.argmax())], len(rows)))
    scored.sort(key=lambda item: -item[0])
    hits = []
    for rank, (score, row, count) in enumerate(scored[:k], start=1):
        fields = {key: value for key, value in dataset[row].items() if key != "embedding"}
        hits.append({"rank": rank, "score": score, "row": row, **fields, "matches": count})
    return hits


def best_per_group(hits: list[dict], column: str) -> list[dict]:
    """The best hit of each value of `column` (hits are best first), with `matches`: that value's number of hits.
    Rows without a value (e.g. not DICOM) are left out."""
    best: dict = {}
    for hit in hits:
        key = hit[column]
        if key is None:
            continue
        if key not in best:
            best[key] = {**hit, "matches": 0}
        best[key]["matches"] += 1
    return list(best.values())


def contact_sheet(hits: list[dict], path: Path, tile: int = 128, columns: int = 5) -> None:
    """A PNG grid of the hits' images (their files, else their stored thumbnails), captioned rank, score and id."""
    from PIL import Image, ImageDraw

    caption_height = 28
    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, hit in enumerate(hits):
        picture = hit_picture(hit)
        scale = tile / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        left, top = (index % columns) * tile, (index // columns) * (tile + caption_height)
        sheet.paste(picture, (left + (tile - picture.width) // 2, top + (tile - picture.height) // 2))
        draw.text((left + 3, top + tile + 2), f"#{hit['rank']} {hit['score']:.3f} {hit['expert']}", fill="black")
        draw.text((left + 3, top + tile + 14), str(hit["id"])[-22:], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def hit_picture(hit: dict):
    """The hit as a PIL image: its stored thumbnail, else its file (DICOM through the percentile window)."""
    import io

    from PIL import Image

    if hit.get("thumbnail"):
        return Image.open(io.BytesIO(hit["thumbnail"])).convert("RGB")
    if hit.get("path"):
        unit = MedMoEImageProcessor().to_display(hit["path"])
        return Image.fromarray((unit.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return Image.new("RGB", (64, 64), "lightgray")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # the modules' warnings
    try:
        searcher = ArchiveSearch(args.index, args.model, args.device, args.nprobe)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    try:
        if args.text is not None:
            query = searcher.text_query(args.text)
        else:
            query = searcher.image_query(args.image, args.window)
        where = {
            column: value
            for column, value in (("modality", args.modality), ("study_uid", args.study), ("patient_id", args.patient))
            if value is not None
        }
        group = {"series": "series_uid", "study": "study_uid"}.get(args.group)
        hits = searcher.search(query, args.k, args.expert, where, group, args.pool)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    shown = [{key: value for key, value in hit.items() if key != "thumbnail"} for hit in hits]
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for hit in shown:
            path = printable(hit.get("path") or "")
            counted = "pooled" if args.pool == "mean" else "matched"
            grouped = f"  {hit[group]} ({hit['matches']} {counted})" if group else ""
            print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['expert']:<12} {printable(hit['id'])}  {path}{grouped}")
    if args.contact_sheet:
        with private_files():  # it shows patients' images
            contact_sheet(hits, args.contact_sheet)
            private_permissions(args.contact_sheet)
        print(f"Contact sheet: {args.contact_sheet}")


if __name__ == "__main__":
    main()
