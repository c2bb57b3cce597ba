"""amct_caffe.log: levels from the environment, and a log file that cannot be written is no failure."""

import logging

import pytest

from amct_caffe import log


@pytest.fixture
def restore_logger():
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = list(logger.handlers), logger.level, getattr(logger, "_amct_configured", False)
    yield logger
    for h in [h for h in logger.handlers if h not in saved[0]]:
        logger.removeHandler(h)
        h.close()
    for h in saved[0]:
        if h not in logger.handlers:
            logger.addHandler(h)
    logger.setLevel(saved[1])
    logger._amct_configured = saved[2]


def test_level_from_env_default_for_unset_empty_and_invalid(monkeypatch):
    monkeypatch.delenv("AMCT_LOG_LEVEL", raising=False)
    assert log.level_from_env("AMCT_LOG_LEVEL") == logging.INFO  # the guide's default, for API users
    assert log.level_from_env("AMCT_LOG_LEVEL", default=logging.WARNING) == logging.WARNING
    monkeypatch.setenv("AMCT_LOG_LEVEL", " debug ")
    assert log.level_from_env("AMCT_LOG_LEVEL", default=logging.WARNING) == logging.DEBUG
    monkeypatch.setenv("AMCT_LOG_LEVEL", "")
    assert log.level_from_env("AMCT_LOG_LEVEL", default=logging.ERROR) == logging.ERROR
    monkeypatch.setenv("AMCT_LOG_LEVEL", "loud")
    assert log.level_from_env("AMCT_LOG_LEVEL", default=logging.WARNING) == logging.WARNING


def _handlers(logger):
    screen = next(h for h in logger.handlers if getattr(h, "_amct", False) and not isinstance(h, logging.FileHandler))
    file = next(h for h in logger.handlers if getattr(h, "_amct", False) and isinstance(h, logging.FileHandler))
    return screen, file


def test_setup_screen_level_overrides_the_environment(monkeypatch, tmp_path, restore_logger):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMCT_LOG_LEVEL", "DEBUG")
    monkeypatch.delenv("AMCT_LOG_FILE_LEVEL", raising=False)
    screen, file = _handlers(log.setup(force=True, screen_level=logging.WARNING))
    assert screen.level == logging.WARNING and file.level == logging.INFO
    screen, _ = _handlers(log.setup(force=True))
    assert screen.level == logging.DEBUG


def test_an_unwritable_log_file_is_reported_once_and_skipped(monkeypatch, tmp_path, capsys, restore_logger):
    """amct_log exists as a file: creating amct_log/amct_caffe.log raised out of the caller's _LOG.info."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "amct_log").write_text("")
    logger = log.setup(force=True, screen_level=logging.ERROR)
    logging.getLogger("amct_caffe.test").info("first")
    logging.getLogger("amct_caffe.test").info("second")
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "file logging is off" in err
    assert "Traceback" not in err
    assert logger is logging.getLogger(log.LOGGER_NAME)


def test_undecodable_file_names_are_logged(monkeypatch, tmp_path, capsys, restore_logger):
    """A name with bytes that are not UTF-8 reaches Python as surrogates; the file handler used to print
    "--- Logging error ---" and a traceback for each such record."""
    monkeypatch.chdir(tmp_path)
    log.setup(force=True, screen_level=logging.ERROR)
    logging.getLogger("amct_caffe.test").info("saved %s", "out/\udcff\udcfeq.prototxt")
    for h in logging.getLogger(log.LOGGER_NAME).handlers:
        h.flush()
    assert "saved out/\\udcff\\udcfeq.prototxt" in (tmp_path / "amct_log/amct_caffe.log").read_text()
    assert "Logging error" not in capsys.readouterr().err


def test_a_log_file_that_stops_taking_writes_is_reported_once(monkeypatch, tmp_path, capsys, restore_logger):
    """A full disk or a file size limit fails the writes inside logging's own emit: it printed a traceback
    per record (39 of them in one calibration); now one line, and the file is left alone."""
    monkeypatch.chdir(tmp_path)
    logger = log.setup(force=True, screen_level=logging.ERROR)
    logging.getLogger("amct_caffe.test").info("opens the file")
    _, file = _handlers(logger)

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    file.stream.close()
    file.stream = Full()
    for i in range(3):
        logging.getLogger("amct_caffe.test").info("record %d", i)
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "No space left on device" in err
    assert "Traceback" not in err and "Logging error" not in err


def test_a_record_logged_under_an_open_progress_bar_gets_a_line_of_its_own():
    """The label-free QAT's warning landed on its bar's line ('retrain: 100%|...| 207/208 [...]2026-... WARNING')."""
    import io
    import logging

    from tqdm import tqdm

    from amct_caffe import log

    stream = io.StringIO()
    logger = log.setup(force=True)
    screen = next(h for h in logger.handlers if getattr(h, "_amct", False) and hasattr(h, "stream")
                  and not hasattr(h, "baseFilename"))
    screen.setStream(stream)
    try:
        for i in tqdm(range(3), file=stream, desc="bar", mininterval=0):
            if i == 1:
                logging.getLogger("amct_caffe.test").warning("a warning in the middle")
    finally:
        log.setup(force=True)
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    said = [line for line in lines if "a warning in the middle" in line]
    assert said and all(line.startswith("20") and "bar:" not in line for line in said), lines
