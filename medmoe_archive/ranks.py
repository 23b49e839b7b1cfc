"""Several processes or machines on one archive, launched by accelerate (or torchrun): each rank takes a
deterministic share of the rows and writes its own part, resumable on its own; the main process merges the parts once
every rank has finished.

    accelerate launch --num_processes 2 -m medmoe_archive.index --model M --images /archive --output_dir OUT

A row belongs to the rank its id hashes to, a PACS instance to the rank its series hashes to (a series' fetches
stay on one rank). Parts live in OUT/parts/rank-RRR-of-NNN; one process writes straight into OUT.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from medmoe_archive.rows import ArchiveRow

PARTS_DIR = "parts"
WAIT_FOR_THE_SLOWEST_RANK = timedelta(days=7)  # ranks that finish early wait at the merge for the others


@dataclass(frozen=True)
class RankShare:
    """This process's share: rank `rank` of `ranks`, and accelerate's state when there is more than one."""

    rank: int = 0
    ranks: int = 1
    state: object = None

    @classmethod
    def of_this_process(cls, device: str) -> "RankShare":
        """The share under accelerate launch or torchrun (WORLD_SIZE > 1: the process group is started, gloo on
        CPUs), else the whole archive."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu", timeout=WAIT_FOR_THE_SLOWEST_RANK)
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, asked: str) -> str:
        """The device this rank embeds on: its own GPU under several processes, else the one asked for."""
        return str(self.state.device) if self.state is not None and asked != "cpu" else asked

    def owns(self, row: ArchiveRow) -> bool:
        """Whether `row` is this rank's: a PACS instance (fetched when called) by its series, so that a series'
        fetches stay on one rank, any other row by its id, which shares the rows out evenly."""
        if self.ranks == 1:
            return True
        key = (row.metadata.get("series_uid") if callable(row.image) else None) or row.id
        return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") % self.ranks == self.rank

    def part_dir(self, output_dir: Path) -> Path:
        """Where this rank writes its chunks, progress and skipped rows."""
        if self.ranks == 1:
            return output_dir
        return output_dir / PARTS_DIR / f"rank-{self.rank:03d}-of-{self.ranks:03d}"

    def part_dirs(self, output_dir: Path) -> list[Path]:
        """Every rank's part folder, in rank order."""
        return [RankShare(rank, self.ranks).part_dir(output_dir) for rank in range(self.ranks)]

    def check_resumable(self, output_dir: Path) -> None:
        """A run resumes with the number of processes it started with (the shares depend on it)."""
        parts = sorted((output_dir / PARTS_DIR).glob("rank-*-of-*")) if output_dir.is_dir() else []
        started = {int(path.name.rpartition("-of-")[2]) for path in parts}
        if (output_dir / "progress.json").is_file():
            started.add(1)
        if started and started != {self.ranks}:
            then = " or ".join(f"{count} process{'es' if count > 1 else ''}" for count in sorted(started))
            raise ValueError(
                f"{output_dir} was started with {then}, and this run has {self.ranks}; resume with as many "
                "processes as it started with, or pass another --output_dir."
            )

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
