"""The BatchNorm statistics files of update_bn (``<bn_dump_dir>/<BatchNorm layer>.npz``).

The BNUpdate layer (the executor's and caffe_patch's) writes, after its last iteration, the
refreshed ``mean`` and ``var`` of one BatchNorm as float32 (C,) arrays, plus ``bn_layer`` and
``iterations``; save_model reads them to fold the refreshed statistics, and checks that the file
holds the statistics of the layer it expects.

File names: ASCII letters, digits, '.', '_' and '-' of the layer name stay, every other byte of its
UTF-8 encoding becomes ``%XX`` (upper-case hex): ``bn/1`` -> ``bn%2F1.npz``, ``bn_1`` -> ``bn_1.npz``.
No two layers share a file, and the name is recovered by percent-decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amct_caffe.errors import AmctError
from amct_caffe.io.files import atomic_output

_F32 = np.float32


_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def dump_file_stem(bn_layer: str) -> str:
    """The file name (without .npz) of ``bn_layer``'s statistics (module doc)."""
    return "".join(chr(b) if b in _KEEP else f"%{b:02X}" for b in bn_layer.encode("utf-8"))


def bn_dump_path(dump_dir, bn_layer: str) -> Path:
    """Where the BNUpdate layer of BatchNorm ``bn_layer`` writes its refreshed statistics."""
    return Path(dump_dir) / f"{dump_file_stem(bn_layer)}.npz"


def write_bn_dump(path: Path, mean: np.ndarray, var: np.ndarray, bn_layer: str, iterations: int) -> None:
    """Write one BatchNorm's refreshed statistics, atomically."""
    with atomic_output(path, "wb") as out:
        np.savez(out, mean=np.asarray(mean, _F32), var=np.asarray(var, _F32), bn_layer=np.array(bn_layer),
                 iterations=np.array(iterations))


def read_bn_dump(path: Path, bn_layer: str, channels: int, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) of BatchNorm ``bn_layer`` with ``channels`` channels from ``path``.

    ``hint`` tells the user how to produce a missing file.
    """
    if not path.is_file():
        raise AmctError(f"update_bn: no refreshed statistics of BatchNorm layer '{bn_layer}' ({path}): {hint}")
    try:
        with np.load(path) as z:
            mean, var = np.asarray(z["mean"], _F32), np.asarray(z["var"], _F32)
            owner = str(z["bn_layer"]) if "bn_layer" in z.files else None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise AmctError(f"update_bn: {path} is not a BatchNorm statistics file ({e}); delete it and run the "
                        "calibration model again") from None
    if owner is not None and owner != bn_layer:
        raise AmctError(f"update_bn: {path} holds the statistics of BatchNorm '{owner}', not of '{bn_layer}'; "
                        "delete it and run the calibration model again")
    if mean.shape != (channels,) or var.shape != (channels,):
        raise AmctError(f"update_bn: {path} holds {mean.size} mean / {var.size} var value(s); BatchNorm "
                        f"'{bn_layer}' has {channels} channels")
    return mean, var
