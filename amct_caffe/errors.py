"""The library's own exception types.

Every error a user can trigger with bad input is one of these, and its message names the
file, layer or field concerned and what to do about it.
"""


class AmctError(Exception):
    """Base class of every error amct_caffe raises on purpose."""


class ModelFormatError(AmctError):
    """A prototxt or caffemodel cannot be read (syntax, truncation, unknown field)."""


class WeightsError(AmctError):
    """Weights do not fit the model: missing, extra, wrongly shaped or unreadable blobs."""


class GraphError(AmctError):
    """The network structure is invalid (undefined bottom, duplicate top, cycle...)."""


class UnsupportedLayerError(AmctError):
    """A layer type the embedded executor does not implement."""


class ConfigError(AmctError):
    """A quantization config field is missing or out of range."""


class FileAccessError(AmctError, OSError):
    """A file cannot be written (or read): a directory in the way, permissions, a full disk...

    Also an OSError, so code that handled the operating system's error keeps working.
    """


class TrainingError(AmctError):
    """Training cannot go on: a solver setting Caffe refuses, a loss that became NaN or infinite..."""


class OutOfMemoryError(AmctError, MemoryError):
    """A model's values do not fit in memory (a batch or an input too large). Also a MemoryError."""


def out_of_memory(error: MemoryError, doing: str) -> MemoryError:
    """The error to raise for ``error`` met while ``doing`` (e.g. "running net.prototxt"): an OutOfMemoryError
    saying what to do, or ``error`` itself if it is one already."""
    if isinstance(error, AmctError):
        return error
    return OutOfMemoryError(f"out of memory {doing}{f' ({error})' if str(error) else ''}: use a smaller batch or "
                            "input shape, or fewer / smaller inputs")
