"""A solver prototxt read and checked as Caffe's Solver constructor does, and its learning rate.

:func:`read_solver_param` parses the SolverParameter text (errors name the file), upgrades the
legacy ``solver_type`` enum into ``type`` (Caffe's UpgradeSolverAsNeeded) and refuses, with a
message naming the field, every setting on which Caffe would abort (its ``CHECK``\\s and
``LOG(FATAL)``\\s) — here at construction, where Caffe sometimes only fails at the first iteration.

:func:`net_params` builds the train and test NetParameters with Caffe's NetState precedence, and
:func:`learning_rate` is SGDSolver::GetLearningRate in float32.
"""

from __future__ import annotations

import os

import numpy as np

from amct_caffe import io
from amct_caffe.errors import TrainingError
from amct_caffe.io.schema import caffe_pb

# SolverParameter.SolverType enum value -> the ``type`` string (Caffe's UpgradeSolverType)
LEGACY_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def read_solver_param(path) -> object:
    """The SolverParameter of the text file ``path``, upgraded and checked (see :func:`check_solver_param`)."""
    param = io.read_prototxt(path, caffe_pb().SolverParameter())
    upgrade_solver_type(param, str(path))
    check_solver_param(param, str(path))
    return param


def upgrade_solver_type(param, where: str) -> None:
    """Caffe's UpgradeSolverType: the deprecated ``solver_type`` enum becomes the ``type`` string."""
    if not param.HasField("solver_type"):
        return
    if param.HasField("type"):
        raise TrainingError(f"{where}: both the old solver_type (enum) and the new type (string) are given; "
                            f"keep only type: \"{param.type}\"")
    param.type = LEGACY_TYPES[param.solver_type]
    param.ClearField("solver_type")


def check_solver_param(param, where: str) -> None:
    """Refuse what Caffe refuses (Solver::Init, InitTrainNet/InitTestNets, the solvers' sanity checks)."""
    def bad(msg: str) -> TrainingError:
        return TrainingError(f"{where}: {msg}")

    train_fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if len(train_fields) != 1:
        raise bad("the solver must give the train net with exactly one of net, net_param, train_net, "
                  f"train_net_param (it gives {', '.join(train_fields) or 'none'})")
    if param.average_loss < 1:
        raise bad(f"average_loss must be >= 1 (it is {param.average_loss})")
    if param.iter_size < 1:
        raise bad(f"iter_size must be >= 1 (it is {param.iter_size})")
    num_test_nets = len(param.test_net) + len(param.test_net_param)
    generic = param.HasField("net") or param.HasField("net_param")
    if (len(param.test_iter) < num_test_nets) if generic else (len(param.test_iter) != num_test_nets):
        raise bad(f"test_iter must be given once per test net ({len(param.test_iter)} test_iter for "
                  f"{num_test_nets} test_net/test_net_param)")
    instances = max(len(param.test_iter), num_test_nets)
    if len(param.test_state) and len(param.test_state) != instances:
        raise bad(f"test_state must be given once per test net or not at all ({len(param.test_state)} for "
                  f"{instances} test net(s))")
    if instances and param.test_interval <= 0:
        raise bad(f"test_interval must be > 0 when there are test nets (it is {param.test_interval})")
    if param.eval_type != "classification":
        raise bad(f"eval_type \"{param.eval_type}\" is not supported: the embedded solver tests "
                  "\"classification\" nets (averaged outputs)")
    if param.lr_policy not in LR_POLICIES:
        raise bad(f"unknown lr_policy \"{param.lr_policy}\"; use one of {', '.join(LR_POLICIES)}")
    if param.lr_policy == "step" and param.stepsize <= 0:
        raise bad(f"lr_policy \"step\" needs stepsize > 0 (it is {param.stepsize})")
    if param.lr_policy == "poly" and param.max_iter <= 0:
        raise bad(f"lr_policy \"poly\" needs max_iter > 0 (it is {param.max_iter})")
    if param.type not in LEGACY_TYPES.values():
        raise bad(f"unknown solver type \"{param.type}\"; use one of {', '.join(LEGACY_TYPES.values())}")
    if param.snapshot_format != caffe_pb().SolverParameter.BINARYPROTO:
        raise bad("snapshot_format HDF5 is not supported by the embedded solver; use BINARYPROTO (the default)")
    if param.test_interval < 0:  # (a negative snapshot, display or max_iter runs as in Caffe: `iter % n == 0`)
        raise bad("test_interval must not be negative")
    if param.snapshot and not param.HasField("snapshot_prefix"):
        raise bad("snapshot is given but snapshot_prefix is not")
    if param.snapshot:
        parent = os.path.dirname(param.snapshot_prefix) or "."
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise bad(f"cannot write to snapshot_prefix '{param.snapshot_prefix}': make sure that the directory "
                      f"{parent} exists and is writable")


def check_solver_type(param, solver_type: str, where: str) -> None:
    """The sanity checks of AdaGradSolver and RMSPropSolver's constructors."""
    if solver_type in ("AdaGrad", "RMSProp") and param.momentum != 0:
        raise TrainingError(f"{where}: momentum cannot be used with {solver_type} (it is {param.momentum}); "
                            "remove it")
    if solver_type == "RMSProp" and not 0 <= param.rms_decay < 1:
        raise TrainingError(f"{where}: rms_decay must be in [0, 1) (it is {param.rms_decay})")


def _read_net(path: str):
    net = io.read_prototxt(path)
    io.upgrade_net(net, path)
    io.clear_batchnorm_param_specs(net, path)  # (Caffe upgrades a net read from a file, not one given inline)
    return net


def _with_state(net, phase: int, override) -> object:
    """``net`` filtered for Caffe's NetState: ``phase``, then the net's own state, then ``override``."""
    state = caffe_pb().NetState()
    state.phase = phase
    state.MergeFrom(net.state)
    if override is not None:
        state.MergeFrom(override)
    net.state.CopyFrom(state)
    io.filter_phase(net, state.phase)
    return net


def net_params(param):
    """(train NetParameter, [test NetParameters]) as Caffe's InitTrainNet / InitTestNets build them.

    Paths are relative to the current directory, as in Caffe. Test nets: the test_net_param
    entries, then the test_net files, then copies of ``net`` / ``net_param`` for the remaining
    test_iter entries; each gets phase TEST merged with its own state and test_state.
    """
    if param.HasField("train_net_param"):
        train = caffe_pb().NetParameter()
        train.CopyFrom(param.train_net_param)
    elif param.HasField("net_param"):
        train = caffe_pb().NetParameter()
        train.CopyFrom(param.net_param)
    else:
        train = _read_net(param.train_net or param.net)
    if param.HasField("train_net_param") or param.HasField("net_param"):
        io.upgrade_net(train, "net_param")
    train_state = param.train_state if param.HasField("train_state") else None
    train = _with_state(train, io.TRAIN, train_state)

    tests = []
    for p in param.test_net_param:
        net = caffe_pb().NetParameter()
        net.CopyFrom(p)
        io.upgrade_net(net, "test_net_param")
        tests.append(net)
    tests += [_read_net(path) for path in param.test_net]
    for _ in range(len(param.test_iter) - len(tests)):
        if param.HasField("net_param"):
            net = caffe_pb().NetParameter()
            net.CopyFrom(param.net_param)
            io.upgrade_net(net, "net_param")
        else:
            net = _read_net(param.net)
        tests.append(net)
    states = list(param.test_state) or [None] * len(tests)
    return train, [_with_state(net, io.TEST, s) for net, s in zip(tests, states, strict=True)]


def learning_rate(param, it: int, current_step: int) -> tuple[np.float32, int]:
    """(rate, current_step) at iteration ``it``: SGDSolver::GetLearningRate.

    With ``base_lr`` = b, ``gamma`` = g, ``power`` = p, ``stepsize`` = s, ``max_iter`` = M:

    - fixed:     b
    - step:      b * g ^ floor(it / s)                (current_step = floor(it / s))
    - exp:       b * g ^ it
    - inv:       b * (1 + g * it) ^ (-p)
    - multistep: b * g ^ current_step, where current_step advances by one (at most, per call) once
      ``it`` reaches ``stepvalue[current_step]``
    - poly:      b * (1 - it / M) ^ p
    - sigmoid:   b * 1 / (1 + exp(-g * (it - s)))

    The arithmetic follows Caffe's types: an integer power ``pow(float, int)`` is computed in double
    then rounded to float; the others in float32.
    """
    b, g, p = np.float32(param.base_lr), np.float32(param.gamma), np.float32(param.power)
    policy = param.lr_policy
    with np.errstate(over="ignore"):  # a diverging schedule gives inf, as in C, not a warning
        return _rate(policy, param, it, current_step, b, g, p)


def _int_pow(b: np.float32, g: np.float32, n: int) -> np.float32:
    """``b * pow(g, n)`` with an int exponent: C++ promotes to double, the result is rounded to float."""
    return np.float32(np.float64(b) * np.float64(g) ** np.float64(n))


def _rate(policy: str, param, it: int, current_step: int, b, g, p) -> tuple[np.float32, int]:
    if policy == "fixed":
        return b, current_step
    if policy == "step":
        current_step = it // param.stepsize
        return _int_pow(b, g, current_step), current_step
    if policy == "exp":
        return _int_pow(b, g, it), current_step
    if policy == "inv":
        return b * np.power(np.float32(1) + g * np.float32(it), -p), current_step
    if policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
        return _int_pow(b, g, current_step), current_step
    if policy == "poly":
        return b * np.power(np.float32(1) - np.float32(it) / np.float32(param.max_iter), p), current_step
    if policy == "sigmoid":
        return b * (np.float32(1) / (np.float32(1) + np.exp(-g * (np.float32(it) - np.float32(param.stepsize))))), \
            current_step
    raise TrainingError(f"unknown lr_policy \"{policy}\"")
