"""Run by tests/test_archive_scale.py under torchrun: medmoe-index (its arguments) whose rank 1 is killed (SIGKILL,
as the out-of-memory killer would) right after it writes its second chunk; torchrun then stops the other ranks."""

import os
import signal
import sys

from medmoe_archive import index

write_chunk = index.ChunkWriter.flush


def write_chunk_then_die(writer) -> None:
    write_chunk(writer)
    if os.environ.get("RANK") == "1" and writer.progress["chunks"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    index.ChunkWriter.flush = write_chunk_then_die
    index.main(sys.argv[1:])
