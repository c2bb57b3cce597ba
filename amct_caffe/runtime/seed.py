"""pycaffe's ``caffe.set_random_seed``: the seed of the draws a model does not seed itself.

Caffe seeds its one generator with it (fillers, Dropout's masks, data shuffling). Here it is the default
``seed`` of the Nets built afterwards (the fillers of learned blobs no caffemodel gives) and the seed of a
solver whose ``random_seed`` is unset (negative); the layers that draw while running (Dropout, DummyData,
the data layers' shuffling and mirroring) keep generators seeded by their own names, so a run repeats
whatever the seed. The values drawn are this runtime's, not Caffe's, in either case.
"""

from __future__ import annotations

from amct_caffe.errors import AmctError

__all__ = ["random_seed", "set_random_seed"]

_seed = 0


def set_random_seed(seed: int) -> None:
    """The default seed of the Nets and solvers made from now on (module doc)."""
    global _seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise AmctError(f"set_random_seed: the seed must be an integer in [0, 2^64), got {seed!r}")
    _seed = seed


def random_seed() -> int:
    """The seed :func:`set_random_seed` set (0 until then)."""
    return _seed
