"""Solver snapshots in Caffe's binary format: ``PREFIX_iter_N.caffemodel`` + ``PREFIX_iter_N.solverstate``.

The .solverstate is Caffe's SolverState message (SGDSolver::SnapshotSolverStateToBinaryProto):
``iter``, ``learned_net`` (the path of the .caffemodel written with it, as written), ``current_step``
(the lr schedule's step) and ``history`` (one BlobProto per history blob, in the solver's order:
for AdaDelta and Adam the second moments follow the first). Either file reads in real Caffe, and
Caffe's read here. Caffe's HDF5 snapshots (``.h5``) are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from amct_caffe import io
from amct_caffe.errors import TrainingError
from amct_caffe.io.files import read_bytes
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.schema import caffe_pb


@dataclass
class SolverStateData:
    """What a .solverstate holds."""

    iter: int
    learned_net: str | None
    current_step: int
    history: list[np.ndarray]


def snapshot_filename(prefix: str, it: int, extension: str) -> str:
    """Caffe's Solver::SnapshotFilename: ``prefix + "_iter_" + iter + extension``."""
    return f"{prefix}_iter_{it}{extension}"


def write_snapshot(net, prefix: str, state: SolverStateData, write_diff: bool = False) -> tuple[str, str]:
    """Write ``net``'s weights and the solver ``state`` (its ``learned_net`` is set here) together.

    Both files are written all-or-nothing: a failure leaves neither a new nor a half-written file.
    ``write_diff`` (Caffe's ``snapshot_diff``) also stores each learned blob's gradient.
    Returns (caffemodel path, solverstate path).
    """
    model_path = snapshot_filename(prefix, state.iter, ".caffemodel")
    state_path = snapshot_filename(prefix, state.iter, ".solverstate")
    weights = {layer.name: [b.data for b in layer.blobs] for layer in net.layers if layer.blobs}
    model = io.net_to_caffemodel(net.net_param, weights)
    if write_diff:  # Blob::ToProto(write_diff): the diff follows the data in each BlobProto
        for lp in model.layer:
            layer = net.layer_dict.get(lp.name)
            for proto, blob in zip(lp.blobs, layer.blobs if layer is not None else (), strict=False):
                proto.diff.extend(np.asarray(blob.diff, np.float32).ravel().tolist())
    msg = caffe_pb().SolverState()
    msg.iter = state.iter
    msg.learned_net = model_path
    msg.current_step = state.current_step
    for h in state.history:
        io.array_to_blob(np.asarray(h, np.float32), msg.history.add())
    out = StagedOutputs()
    out.add_bytes(model_path, model.SerializeToString())
    out.add_bytes(state_path, msg.SerializeToString())
    out.commit()
    return model_path, state_path


def read_solver_state(path) -> SolverStateData:
    """The content of a binary .solverstate (ours or Caffe's)."""
    if str(path).endswith(".h5"):
        raise TrainingError(f"{path}: HDF5 solver states are not supported by the embedded solver; snapshot with "
                            "snapshot_format: BINARYPROTO (Caffe's default) and restore the .solverstate")
    data = read_bytes(path, "solver state", TrainingError)
    msg = caffe_pb().SolverState()
    try:
        msg.ParseFromString(data)
    except (DecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: not a readable .solverstate (truncated, or not Caffe's binary SolverState): "
                            f"{e}") from None
    history = [io.blob_to_array(b, f"{path}: history blob {i}") for i, b in enumerate(msg.history)]
    return SolverStateData(int(msg.iter), msg.learned_net if msg.HasField("learned_net") else None,
                           int(msg.current_step), [np.asarray(h, np.float32) for h in history])


def conform_history(state: SolverStateData, history: list[np.ndarray], where: str) -> list[np.ndarray]:
    """``state.history`` shaped as the solver's ``history`` (SGDSolver's CHECK_EQ on the number of blobs)."""
    if len(state.history) != len(history):
        raise TrainingError(f"{where}: the solver state has {len(state.history)} history blob(s), this solver and net "
                            f"need {len(history)}; was it saved by the same solver type on the same net?")
    out = []
    for i, (got, want) in enumerate(zip(state.history, history, strict=True)):
        if got.size != want.size:
            raise TrainingError(f"{where}: history blob {i} has shape {list(got.shape)}, the parameter it belongs to "
                                f"{list(want.shape)}")
        out.append(np.ascontiguousarray(got.reshape(want.shape), np.float32))
    return out
