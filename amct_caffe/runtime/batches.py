"""pycaffe's whole-set calls of a Net: ``forward_all`` and ``forward_backward_all`` (``python/caffe/pycaffe.py``).

Both cut arrays of any length along axis 0 into batches of the net's batch size (the first axis of its first
blob), run each batch, and stack the per-sample results. A last, short batch is completed with zeros (of the
arrays' trailing shape) and the results of those padding samples are dropped, as pycaffe does, so a net whose
layers mix samples (a BatchNorm on batch statistics) sees the zeros too.

* ``forward_all(blobs=None, **inputs)``: {output (and each of ``blobs``): array (N, ...)}.
* ``forward_backward_all(blobs=None, diffs=None, **arrays)``: the inputs among ``arrays`` feed the forwards,
  the outputs among them are the diffs of each backward; returns ({output / blob: data}, {input / diff:
  gradient}), each (N, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from amct_caffe.errors import GraphError

__all__ = ["WholeSetCalls"]


class WholeSetCalls:
    """The two calls, for a class with pycaffe's ``blobs``, ``inputs``, ``outputs``, ``forward`` and ``backward``."""

    def _batches(self, arrays: Mapping[str, np.ndarray]) -> Iterator[dict]:
        """``arrays`` (all of one length N) in slices of the net's batch size, the last completed with zeros."""
        if not arrays:
            return
        arrays = {name: np.asarray(a) for name, a in arrays.items()}  # (lists too)
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise GraphError(f"the arrays to run in batches differ in length: {lengths}")
        total = next(iter(lengths.values()))
        size = next(iter(self.blobs.values())).shape[0]
        if size <= 0:
            raise GraphError(f"the net's batch size is {size}: no batch can be cut")
        for start in range(0, total - total % size, size):
            yield {name: a[start:start + size] for name, a in arrays.items()}
        rest = total % size
        if rest:
            yield {name: np.concatenate([a[total - rest:], np.zeros((size - rest,) + a.shape[1:], a.dtype)])
                   for name, a in arrays.items()}

    @staticmethod
    def _stacked(samples: dict[str, list], keep: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(rows)[:keep] for name, rows in samples.items()}

    def forward_all(self, blobs=None, **kwargs) -> dict[str, np.ndarray]:
        """Forward over inputs of any length (module doc); {blob: array}. Without inputs, one forward of the
        blobs as they are (pycaffe fails there)."""
        if not kwargs:
            return {name: np.array(data) for name, data in self.forward(blobs=blobs).items()}
        results: dict[str, list] = {name: [] for name in set(self.outputs) | set(blobs or [])}
        for batch in self._batches(kwargs):
            for name, data in self.forward(blobs=blobs, **batch).items():
                results[name].extend(_samples(name, data))
        return self._stacked(results, _length(kwargs, results))

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs) -> tuple[dict, dict]:
        """Forward and backward over arrays of any length (module doc); ({blob: data}, {blob: diff}). Without
        arrays, one forward and backward of the blobs as they are (pycaffe fails there)."""
        if not kwargs:
            return ({name: np.array(v) for name, v in self.forward(blobs=blobs).items()},
                    {name: np.array(v) for name, v in self.backward(diffs=diffs).items()})
        data: dict[str, list] = {name: [] for name in set(self.outputs) | set(blobs or [])}
        grads: dict[str, list] = {name: [] for name in set(self.inputs) | set(diffs or [])}
        forwards = list(self._batches({n: kwargs[n] for n in self.inputs if n in kwargs}))
        backwards = list(self._batches({n: kwargs[n] for n in self.outputs if n in kwargs}))
        for i in range(max(len(forwards), len(backwards))):
            for name, value in self.forward(blobs=blobs, **(forwards[i] if i < len(forwards) else {})).items():
                data[name].extend(_samples(name, value))
            for name, value in self.backward(diffs=diffs, **(backwards[i] if i < len(backwards) else {})).items():
                grads[name].extend(_samples(name, value))
        keep = _length(kwargs, data)
        return self._stacked(data, keep), self._stacked(grads, keep)


def _length(given: Mapping[str, np.ndarray], results: dict[str, list]) -> int:
    """How many samples the caller gave: the results past it are the padding's."""
    return len(next(iter(given.values())))


def _samples(name: str, value) -> np.ndarray:
    """A copy of blob ``name``'s batch, to gather sample by sample; a blob without a batch axis (a loss) has none."""
    value = np.array(value)
    if value.ndim == 0:
        raise GraphError(f"blob '{name}' holds one value (shape []), not one per sample: the whole-set calls "
                         "gather blobs sample by sample; name others (blobs=..., diffs=...), or call forward()")
    return value
