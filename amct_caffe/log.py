"""Logging as the user guide specifies.

``AMCT_LOG_LEVEL`` sets what reaches the screen (stderr) and ``AMCT_LOG_FILE_LEVEL`` what goes
to ``amct_log/amct_caffe.log`` under the working directory. Values DEBUG, INFO, WARNING,
ERROR, case-insensitive; INFO by default. Library modules only call ``logging.getLogger``;
:func:`setup` is run by the public API entry points and the CLI, once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER_NAME = "amct_caffe"
LOG_DIR = "amct_log"
LOG_FILE = "amct_caffe.log"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_FORMAT = "%(asctime)s - %(levelname)s - [AMCT]:[%(name)s]: %(message)s"


def level_from_env(var: str) -> int:
    value = os.environ.get(var, "INFO").strip().upper()
    if value not in _LEVELS:
        logging.getLogger(LOGGER_NAME).warning("%s=%r is not one of %s; using INFO", var,
                                               os.environ.get(var), ", ".join(_LEVELS))
        return logging.INFO
    return _LEVELS[value]


class _LazyFileHandler(logging.FileHandler):
    """Creates amct_log/ and the file only when the first record arrives."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def setup(force: bool = False) -> logging.Logger:
    """Attach the screen and file handlers to the ``amct_caffe`` logger (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if getattr(logger, "_amct_configured", False) and not force:
        return logger
    for h in [h for h in logger.handlers if getattr(h, "_amct", False)]:
        logger.removeHandler(h)
    screen_level = level_from_env("AMCT_LOG_LEVEL")
    file_level = level_from_env("AMCT_LOG_FILE_LEVEL")
    screen = logging.StreamHandler()
    screen.setLevel(screen_level)
    screen.setFormatter(logging.Formatter(_FORMAT))
    file = _LazyFileHandler(os.path.join(os.getcwd(), LOG_DIR, LOG_FILE), delay=True, encoding="utf-8")
    file.setLevel(file_level)
    file.setFormatter(logging.Formatter(_FORMAT))
    for h in (screen, file):
        h._amct = True
        logger.addHandler(h)
    logger.setLevel(min(screen_level, file_level))
    logger._amct_configured = True
    return logger
