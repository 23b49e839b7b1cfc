"""Archive rows to model inputs: each row read and decoded once (DICOM through a window, its frame), resized and
normalised, with its thumbnail; in this process or in worker processes that decode while the model embeds, in source
order either way. A row that cannot be used is skipped with its reason, never raised; with workers, a worker that
crashes or hangs on a row costs that row (skipped as `decoder_crashed` or `decode_timeout`) and is replaced.

    for prepared in prepare_rows(rows, image_processor, window="lung", thumbnail_size=96, workers=2):
        prepared.pixels      # [3, H, W] model input, or None when prepared.skipped says why not

A PACS instance (a row whose image is a callable) is fetched in this process, then decoded like a file.
"""

from __future__ import annotations

import io
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import wait

import torch

from medmoe_archive.dicomweb import PacsError
from medmoe_archive.rows import ArchiveRow
from modeling_medmoe.dicom import is_dicom
from modeling_medmoe.limits import InputTooLarge

ROW_TIMEOUT_SECONDS = 120.0  # a worker still decoding one row after this long is stopped (the row is skipped)
ROWS_AHEAD_PER_WORKER = 8  # rows handed out or finished ahead of the one the caller waits for, per worker


@dataclass
class PreparedRow:
    """A row ready to embed (`pixels` [3, H, W]; `thumbnail` PNG bytes, or None when not asked for) or skipped
    (`skipped` = {"id", "path", "reason", "detail"})."""

    row: ArchiveRow
    pixels: torch.Tensor | None = None
    thumbnail: bytes | None = None
    skipped: dict | None = None


def skipped_row(row: ArchiveRow, reason: str, detail: str = "") -> PreparedRow:
    return PreparedRow(row, skipped={"id": row.id, "path": row.path, "reason": reason, "detail": detail})


def thumbnail_png(unit_image: torch.Tensor, size: int) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes of at most size x size pixels."""
    from PIL import Image

    pixels = (unit_image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    image = Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes())
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fetched(row: ArchiveRow) -> ArchiveRow | PreparedRow:
    """`row` with its image in hand: a PACS instance (a callable image) is fetched here; a fetch that fails makes
    the row skipped (`fetch_failed`, one line naming the PACS and what failed)."""
    if row.problem is not None or not callable(row.image):
        return row
    try:
        return replace(row, image=row.image())
    except PacsError as error:
        return skipped_row(row, "fetch_failed", str(error))


def prepare_row(row: ArchiveRow, image_processor, window: str | None, thumbnail_size: int) -> PreparedRow:
    """One row through the image processor (`window` for DICOM and 16-bit images, the row's frame), with a
    `thumbnail_size` thumbnail (0 = none), or skipped with the reason it cannot be used."""
    prepared = fetched(row)
    if isinstance(prepared, PreparedRow):
        return prepared
    if row.problem is not None:
        return skipped_row(row, row.problem, row.detail)
    image = prepared.image
    try:
        unit = image_processor.to_display(image, window=window, frame=row.metadata.get("frame"))
    except FileNotFoundError as error:
        return skipped_row(row, "missing_file", str(error))
    except InputTooLarge as error:
        return skipped_row(row, "too_large", str(error))
    except (ValueError, OSError, TypeError) as error:
        return skipped_row(row, "undecodable_dicom" if is_dicom(image) else "undecodable_image", str(error))
    thumbnail = thumbnail_png(unit, thumbnail_size) if thumbnail_size else None
    return PreparedRow(row, image_processor.unit_to_model_input(unit), thumbnail)


def prepare_rows(
    rows: Iterable[ArchiveRow], image_processor, window: str | None = None, thumbnail_size: int = 0,
    workers: int = 0, row_timeout: float = ROW_TIMEOUT_SECONDS,
) -> Iterator[PreparedRow]:  # fmt: skip
    """Every row of `rows` prepared (`prepare_row`), in order: here (`workers` = 0) or in `workers` processes."""
    if workers == 0:
        for row in rows:
            yield prepare_row(row, image_processor, window, thumbnail_size)
        return
    with DecodingPool(image_processor, window, thumbnail_size, workers, row_timeout) as pool:
        yield from pool.prepare(rows)


def worker_loop(connection, image_processor, window: str | None, thumbnail_size: int) -> None:
    """A worker: (number, row) in, (number, PreparedRow with pixels as a numpy array) out, until None comes."""
    torch.set_num_threads(1)  # the workers share the cores with each other and the model
    while (task := connection.recv()) is not None:
        number, row = task
        prepared = prepare_row(row, image_processor, window, thumbnail_size)
        if prepared.pixels is not None:
            prepared.pixels = prepared.pixels.numpy()  # plain bytes through the pipe (no shared-memory handles)
        connection.send((number, prepared))


class Worker:
    """One decoding process and its end of the pipe; `task` is the (number, row, started) it holds, if any."""

    def __init__(self, context, arguments: tuple):
        self.connection, worker_end = context.Pipe()
        self.process = context.Process(target=worker_loop, args=(worker_end, *arguments), daemon=True)
        self.process.start()
        worker_end.close()
        self.task: tuple[int, ArchiveRow, float] | None = None

    def give(self, number: int, row: ArchiveRow) -> None:
        self.connection.send((number, row))
        self.task = (number, row, time.monotonic())

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except OSError:
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


class DecodingPool:
    """`workers` processes preparing rows in order, at most ROWS_AHEAD_PER_WORKER rows per worker ahead of the
    caller. Processes are forked where the platform allows (the image processor is inherited), else spawned."""

    def __init__(self, image_processor, window: str | None, thumbnail_size: int, workers: int, row_timeout: float):
        method = "fork" if sys.platform == "linux" else "spawn"
        self.context = multiprocessing.get_context(method)
        self.arguments = (image_processor, window, thumbnail_size)
        self.row_timeout = row_timeout
        self.workers = [Worker(self.context, self.arguments) for _ in range(workers)]

    def __enter__(self) -> "DecodingPool":
        return self

    def __exit__(self, *exception) -> None:
        for worker in self.workers:
            worker.stop(kill=exception[0] is not None)

    def replace(self, worker: Worker) -> None:
        worker.stop(kill=True)
        self.workers[self.workers.index(worker)] = Worker(self.context, self.arguments)

    def prepare(self, rows: Iterable[ArchiveRow]) -> Iterator[PreparedRow]:
        source, finished, next_out, exhausted = enumerate(rows), {}, 0, False
        most_ahead = ROWS_AHEAD_PER_WORKER * len(self.workers)
        next_number = 0
        while True:
            for worker in self.workers:  # hand rows to idle workers (PACS instances fetched here first)
                while worker.task is None and not exhausted and next_number - next_out < most_ahead:
                    try:
                        number, row = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    next_number = number + 1
                    ready = fetched(row)
                    if isinstance(ready, PreparedRow) or ready.problem is not None:
                        finished[number] = (
                            ready if isinstance(ready, PreparedRow) else skipped_row(row, row.problem, row.detail)
                        )
                        continue
                    worker.give(number, ready)
            while next_out in finished:
                yield finished.pop(next_out)
                next_out += 1
            busy = [worker for worker in self.workers if worker.task is not None]
            if not busy:
                if exhausted:
                    return
                continue
            self.collect(busy, finished)

    def collect(self, busy: list[Worker], finished: dict) -> None:
        """Wait for an answer, a crash or a timeout among the `busy` workers and record each into `finished`."""
        deadline = min(worker.task[2] for worker in busy) + self.row_timeout
        ready = wait(
            [worker.connection for worker in busy] + [worker.process.sentinel for worker in busy],
            timeout=max(0.0, deadline - time.monotonic()),
        )
        for worker in busy:
            number, row, started = worker.task
            if worker.connection in ready or worker.connection.poll():
                try:
                    answered, prepared = worker.connection.recv()
                except (EOFError, OSError):  # the worker died while answering
                    finished[number] = skipped_row(row, "decoder_crashed", self.exit_detail(worker))
                    self.replace(worker)
                    continue
                if prepared.pixels is not None:
                    prepared.pixels = torch.from_numpy(prepared.pixels)
                finished[answered] = prepared
                worker.task = None
            elif worker.process.sentinel in ready:
                finished[number] = skipped_row(row, "decoder_crashed", self.exit_detail(worker))
                self.replace(worker)
            elif time.monotonic() - started >= self.row_timeout:
                detail = f"still decoding after {self.row_timeout:g} s; the worker was stopped"
                finished[number] = skipped_row(row, "decode_timeout", detail)
                self.replace(worker)

    @staticmethod
    def exit_detail(worker: Worker) -> str:
        worker.process.join(timeout=5)
        return f"the decoding worker ended (exit code {worker.process.exitcode}) while reading this row"
