"""Logging for the training scripts, as transformers' and accelerate's example scripts set it up: the main process at
--log_level (info by default), the other processes at warning, on stdout; the main process's log also goes to a file
in the run folder. Modules log through `logging.getLogger(__name__)`; progress bars stay on stderr."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FILE = "run.log"  # the main process's log, in the run or output folder
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_logging(level: str, main_process: bool, log_file: Path | None = None) -> None:
    """Route every logger's records to stdout (and the main process's to `log_file` too), at `level` on the main
    process and warning on the others. transformers' and datasets' own loggers keep their levels."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        format=FORMAT,
        datefmt=DATE_FORMAT,
        level=getattr(logging, level.upper()) if main_process else logging.WARNING,
        handlers=handlers,
        force=True,
    )
