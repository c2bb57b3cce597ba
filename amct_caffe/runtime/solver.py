"""pycaffe's solvers on the embedded executor, computing what Caffe computes, in float32 and in Caffe's order.

``solver = SGDSolver("solver.prototxt")`` (or Nesterov/AdaGrad/RMSProp/AdaDelta/Adam, or
``get_solver(path)`` choosing by the prototxt's ``type``); then ``solver.net``, ``solver.test_nets``,
``solver.iter``, ``solver.step(n)``, ``solver.solve(resume_file=None)``, ``solver.snapshot()``,
``solver.restore(state_file)``, ``solver.add_callback(on_start, on_gradients_ready)`` as in pycaffe.

One iteration (Caffe's Solver::Step and SGDSolver::ApplyUpdate):

1. zero the learned blobs' diffs; every ``test_interval`` iterations run the test nets (TestAll);
2. ``iter_size`` times forward + backward, the diffs accumulating; loss = mean of the losses;
3. rate = the ``lr_policy``'s learning rate (:func:`~.solver_param.learning_rate`);
4. ClipGradients: if ``clip_gradients`` >= 0 and the global L2 norm ``n = sqrt(sum_i |g_i|^2)`` of
   all diffs exceeds it, every diff is scaled by ``clip_gradients / n``;
5. for each learned blob i (lr_mult ``l_i``, decay_mult ``d_i``):
   Normalize ``g_i *= 1 / iter_size``; Regularize ``g_i += wd * d_i * w_i`` (L2) or
   ``g_i += wd * d_i * sign(w_i)`` (L1); then the solver's ComputeUpdateValue with local rate
   ``r_i = rate * l_i`` turns ``g_i`` into the update ``u_i`` (each class documents its rule);
6. Net::Update: ``w_i -= u_i``, in place, so test nets sharing the arrays see it; ``iter += 1``;
   every ``snapshot`` iterations write PREFIX_iter_N.caffemodel and .solverstate.

A loss that is NaN or infinite stops training with :class:`~amct_caffe.errors.TrainingError` before
the weights are touched (Caffe would go on). Messages go to ``logging``; ``solve`` shows a progress bar.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np
from tqdm import tqdm

from amct_caffe.errors import AmctError, TrainingError
from amct_caffe.runtime import threads
from amct_caffe.runtime.net import Net
from amct_caffe.runtime.solver_param import check_solver_type, learning_rate, net_params, read_solver_param
from amct_caffe.runtime.seed import random_seed
from amct_caffe.runtime.solver_state import (SolverStateData, conform_history, read_solver_state,
                                             write_snapshot)

try:  # SGD's whole step in one pass (csrc/src/sgd.cpp); SGDSolver.compute_update_value is its reference
    from amct_caffe._kernels import sgd_update as SGD_KERNEL
except ImportError:
    SGD_KERNEL = None

_LOG = logging.getLogger(__name__)
_F = np.float32


class Solver(ABC):
    """The shared machinery of Caffe's solvers (Solver + SGDSolver); subclasses give the update rule."""

    type_name = ""
    history_sets = 1  # history blobs per learned blob (AdaDelta and Adam keep two)

    def __init__(self, param_file, *, progress: bool | None = None):
        """Read the solver prototxt ``param_file`` and build the train net and test nets.

        ``progress``: show ``solve``'s progress bar (``None``: only on a terminal).
        """
        self._where = str(param_file)
        self.param = read_solver_param(param_file)
        check_solver_type(self.param, self.type_name, self._where)
        self.progress = progress
        seed = int(self.param.random_seed) if self.param.random_seed >= 0 else random_seed()  # (runtime/seed.py)
        try:
            train, tests = net_params(self.param)
        except AmctError as e:
            raise type(e)(f"{self._where}: {e}") from None
        self.net = self._build_net(train, "train net", seed)
        self.test_nets = [self._build_net(t, f"test net #{i}", seed) for i, t in enumerate(tests)]
        if self.param.regularization_type not in ("L1", "L2") and self.param.weight_decay and \
                any(decay_mult for _, _, decay_mult in self.net.learnable_params()):
            # (Caffe reads the type only for a blob with a weight decay, aborting at the first update)
            raise TrainingError(f"{self._where}: unknown regularization_type \"{self.param.regularization_type}\"; "
                                "use L2 or L1")
        self._iter = 0
        self._current_step = 0
        self._history = [np.zeros(b.shape, _F) for _ in range(self.history_sets)
                         for b, _, _ in self.net.learnable_params()]
        self._losses: list[np.float32] = []
        self._smoothed_loss = _F(0)
        self._callbacks: list[tuple] = []
        self._bar = None
        # [[(output name, mean value)] per test net] of the last TestAll, as Caffe logs them
        self.test_scores: list[list[tuple[str, float]]] = []

    def _build_net(self, net_param, what: str, seed: int) -> Net:
        try:
            return Net(net_param, phase=net_param.state.phase, seed=seed)
        except AmctError as e:
            raise type(e)(f"{self._where}: {what}: {e}") from None

    # ---------------------------------------------------------------- pycaffe surface
    @property
    def iter(self) -> int:
        """The number of weight updates done so far."""
        return self._iter

    @property
    def type(self) -> str:
        return self.type_name

    def add_callback(self, on_start, on_gradients_ready) -> None:
        """Call ``on_start()`` before each iteration's forward passes and ``on_gradients_ready()``
        before its update (pycaffe's Solver.add_callback; e.g. to feed each iteration's data)."""
        self._callbacks.append((on_start, on_gradients_ready))

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Solver::Step); the displayed loss is smoothed over them."""
        if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)):
            raise AmctError(f"{self._where}: step(iters): iters must be an integer, got {iters!r}")
        start_iter = self._iter
        stop_iter = self._iter + int(iters)
        self._losses = []
        self._smoothed_loss = _F(0)
        p = self.param
        while self._iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self._iter % p.test_interval == 0 and (self._iter > 0 or p.test_initialization):
                self.test_all()
            for on_start, _ in self._callbacks:
                on_start()
            display = bool(p.display) and self._iter % p.display == 0
            loss = _F(0)
            # A diverging net overflows: the loss check below says so with the iteration, which numpy's
            # warnings from deep inside a layer would not.
            with np.errstate(over="ignore", invalid="ignore"):
                for _ in range(p.iter_size):  # the diffs accumulate over the forward/backward passes
                    self.net.forward()
                    loss += _F(self.net.loss)
                    self.net.backward()
                loss /= _F(p.iter_size)
            if not np.isfinite(loss):
                raise TrainingError(f"{self._where}: the loss is {float(loss)} at iteration {self._iter}: training "
                                    "diverged; lower base_lr, set clip_gradients, or check the data")
            self._update_smoothed_loss(loss, start_iter)
            if display:
                self._log_outputs()
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            self._iter += 1  # always the number of updates done
            if p.snapshot and self._iter % p.snapshot == 0:
                self.snapshot()
            if self._bar is not None:
                self._bar.update(1)

    def solve(self, resume_file=None, *, progress: bool | None = None) -> None:
        """Train up to ``max_iter`` (Caffe's Solver::Solve), after ``restore(resume_file)`` if given.

        Snapshots at the end unless ``snapshot_after_train`` is false or the last iteration just
        did; then, as Caffe, one more forward of the train net for the displayed loss and a TestAll
        when ``iter`` falls on ``display`` / ``test_interval``.
        """
        p = self.param
        _LOG.info("Solving %s", self.net.net_param.name)
        _LOG.info("Learning Rate Policy: %s", p.lr_policy)
        if resume_file is not None:
            _LOG.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self._iter
        show = self.progress if progress is None else progress
        # disable=None: tqdm shows the bar only on a terminal
        with tqdm(total=max(p.max_iter - start_iter, 0), desc="training", unit="iter",
                  disable=None if show is None else not show) as bar:
            self._bar = bar
            try:
                self.step(p.max_iter - self._iter)
            finally:
                self._bar = None
        if p.snapshot_after_train and (not p.snapshot or self._iter % p.snapshot != 0):
            self.snapshot()
        if p.display and self._iter % p.display == 0:
            self.net.forward()
            self._update_smoothed_loss(_F(self.net.loss), start_iter)
            _LOG.info("Iteration %d, loss = %s", self._iter, _fmt(self._smoothed_loss))
        if p.test_interval and self._iter % p.test_interval == 0:
            self.test_all()
        _LOG.info("Optimization Done.")

    # ---------------------------------------------------------------- testing and display
    def test_all(self) -> list[list[tuple[str, float]]]:
        """Run every test net ``test_iter`` times on the current weights (Caffe's TestAll).

        Each output value is averaged over the runs (summed in float32, divided by test_iter) and
        logged; the result is also kept in ``test_scores``.
        """
        self.test_scores = [self._test(i) for i in range(len(self.test_nets))]
        return self.test_scores

    def _test(self, k: int) -> list[tuple[str, float]]:
        net = self.test_nets[k]
        _LOG.info("Iteration %d, Testing net (#%d)", self._iter, k)
        try:
            net.share_with(self.net)
        except AmctError as e:
            raise type(e)(f"{self._where}: test net #{k}: {e}") from None
        runs = self.param.test_iter[k]
        sums: list[tuple[str, np.ndarray]] = []
        loss = _F(0)
        for i in range(runs):
            out = net.forward()
            loss += _F(net.loss)
            values = [(name, np.asarray(out[name], _F).ravel()) for name in net.outputs]
            sums = [(n, v.copy()) for n, v in values] if i == 0 else \
                [(n, s + v) for (n, s), (_, v) in zip(sums, values, strict=True)]
        if self.param.test_compute_loss:
            _LOG.info("Test loss: %s", _fmt(loss / _F(runs)))
        weights = net.blob_loss_weights
        scores = []
        for name, total in sums:
            for value in total:
                mean = _F(value) / _F(runs)
                w = weights.get(name, 0.0)
                extra = f" (* {_fmt(w)} = {_fmt(_F(w) * mean)} loss)" if w else ""
                _LOG.info("    Test net output #%d: %s = %s%s", len(scores), name, _fmt(mean), extra)
                scores.append((name, float(mean)))
        return scores

    def _update_smoothed_loss(self, loss: np.float32, start_iter: int) -> None:
        """Caffe's UpdateSmoothedLoss: the mean of the last ``average_loss`` losses of this step()."""
        n = self.param.average_loss
        if len(self._losses) < n:
            self._losses.append(loss)
            size = len(self._losses)
            self._smoothed_loss = (self._smoothed_loss * _F(size - 1) + loss) / _F(size)
        else:
            idx = (self._iter - start_iter) % n
            self._smoothed_loss += (loss - self._losses[idx]) / _F(n)
            self._losses[idx] = loss

    def _log_outputs(self) -> None:
        _LOG.info("Iteration %d, loss = %s", self._iter, _fmt(self._smoothed_loss))
        weights = self.net.blob_loss_weights
        index = 0
        for name in self.net.outputs:
            w = weights.get(name, 0.0)
            for v in np.asarray(self.net.blobs[name].data, _F).ravel():
                extra = f" (* {_fmt(w)} = {_fmt(_F(w) * v)} loss)" if w else ""
                _LOG.info("    Train net output #%d: %s = %s%s", index, name, _fmt(v), extra)
                index += 1

    # ---------------------------------------------------------------- the update
    def apply_update(self) -> None:
        """SGDSolver::ApplyUpdate on the accumulated diffs (steps 3-6 of the module docstring)."""
        p = self.param
        rate, self._current_step = learning_rate(p, self._iter, self._current_step)
        if p.display and self._iter % p.display == 0:
            _LOG.info("Iteration %d, lr = %s", self._iter, _fmt(rate))
        params = self.net.learnable_params()
        self._clip_gradients(params)
        wd = _F(p.weight_decay)
        for i, (blob, lr_mult, decay_mult) in enumerate(params):
            g = blob.diff
            if p.iter_size != 1:  # Normalize: undo the accumulation of iter_size passes
                g *= _F(1) / _F(p.iter_size)
            local_decay = wd * _F(decay_mult)
            if self._fused_update(i, blob, local_decay, rate * _F(lr_mult)):
                continue  # Regularize, ComputeUpdateValue and this blob's Net::Update done at once
            if local_decay:  # Regularize
                if p.regularization_type == "L2":
                    g += local_decay * blob.data
                else:  # L1 (check_solver_param refused anything else); caffe_cpu_sign: sign(0) = 0
                    g += local_decay * np.sign(blob.data).astype(_F)
            update = self.compute_update_value(i, g, rate * _F(lr_mult))
            if update is not blob.diff:  # into the diff's own memory: a Python layer or a callback may keep it
                np.copyto(blob.diff, update)
            # Net::Update, in place: test nets share these arrays
            np.subtract(blob.data, blob.diff, out=blob.data)

    def _fused_update(self, i: int, blob, local_decay: np.float32, local_rate: np.float32) -> bool:
        """Steps 5-6 for learned blob ``i`` in one pass, the same bytes as the operations one by one;
        False where the solver has no such pass (then they run one by one)."""
        return False

    def _clip_gradients(self, params) -> None:
        clip = _F(self.param.clip_gradients)
        if clip < 0:
            return
        sumsq = _F(0)
        for blob, _, _ in params:
            d = blob.diff.ravel()
            sumsq += _F(np.dot(d, d))
        norm = np.sqrt(sumsq)
        if norm > clip:
            scale = clip / norm
            _LOG.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                      _fmt(norm), _fmt(clip), _fmt(scale))
            for blob, _, _ in params:
                blob.diff *= scale

    @abstractmethod
    def compute_update_value(self, i: int, g: np.ndarray, local_rate: np.float32) -> np.ndarray:
        """The update of learned blob ``i`` from its gradient ``g`` (may be modified); per solver type."""

    # ---------------------------------------------------------------- snapshots
    def snapshot(self) -> tuple[str, str]:
        """Write ``snapshot_prefix``_iter_N.caffemodel and .solverstate (Caffe's Solver::Snapshot)."""
        prefix = self.param.snapshot_prefix
        state = SolverStateData(self._iter, None, self._current_step, self._history)
        model_path, state_path = write_snapshot(self.net, prefix, state, self.param.snapshot_diff)
        _LOG.info("Snapshotting to binary proto file %s", model_path)
        _LOG.info("Snapshotting solver state to binary proto file %s", state_path)
        return model_path, state_path

    def restore(self, state_file) -> None:
        """Continue from a .solverstate (ours or Caffe's): iter, lr step, histories, and the weights
        of the .caffemodel its ``learned_net`` names (a path relative to the current directory, as in Caffe)."""
        state = read_solver_state(state_file)
        history = conform_history(state, self._history, str(state_file))
        if state.learned_net is not None:
            self.net.copy_from(state.learned_net)
        self._iter = state.iter
        self._current_step = state.current_step
        for mine, saved in zip(self._history, history, strict=True):
            mine[...] = saved


class SGDSolver(Solver):
    """Stochastic gradient descent with momentum ``m``: ``h = m * h + r * g``; ``u = h``."""

    type_name = "SGD"

    def compute_update_value(self, i, g, local_rate):
        h = self._history[i]
        h *= _F(self.param.momentum)  # caffe_cpu_axpby: y = beta * y, then y += alpha * x
        h += local_rate * g
        return h.copy()

    def _fused_update(self, i, blob, local_decay, local_rate):
        """L2 (or no) decay: ``csrc/src/sgd.cpp`` rounds each operation as the NumPy steps do."""
        if SGD_KERNEL is None or (local_decay and self.param.regularization_type != "L2"):
            return False
        w, g, h = blob.data, blob.diff, self._history[i]
        if not all(a.dtype == _F and a.flags.c_contiguous and a.flags.writeable for a in (w, g, h)):
            return False
        SGD_KERNEL(w, g, h, float(local_decay), float(_F(self.param.momentum)), float(local_rate), threads.workers())
        return True


class NesterovSolver(Solver):
    """Nesterov's accelerated gradient: ``h' = m * h + r * g``; ``u = (1 + m) * h' - m * h``."""

    type_name = "Nesterov"

    def compute_update_value(self, i, g, local_rate):
        m = _F(self.param.momentum)
        h = self._history[i]
        u = h.copy()  # the previous history, to step back
        h *= m
        h += local_rate * g
        u *= -m
        u += (_F(1) + m) * h
        return u


class AdaGradSolver(Solver):
    """AdaGrad: ``h = h + g^2``; ``u = r * g / (sqrt(h) + delta)`` (momentum must be 0)."""

    type_name = "AdaGrad"

    def compute_update_value(self, i, g, local_rate):
        h = self._history[i]
        h += np.square(g)
        return local_rate * (g / (np.sqrt(h) + _F(self.param.delta)))


class RMSPropSolver(Solver):
    """RMSProp with decay ``rho`` (``rms_decay``): ``h = rho * h + (1 - rho) * g^2``;
    ``u = r * g / (sqrt(h) + delta)`` (momentum must be 0)."""

    type_name = "RMSProp"

    def compute_update_value(self, i, g, local_rate):
        rho = _F(self.param.rms_decay)
        h = self._history[i]
        h *= rho
        h += (_F(1) - rho) * np.square(g)
        return local_rate * (g / (np.sqrt(h) + _F(self.param.delta)))


class AdaDeltaSolver(Solver):
    """AdaDelta with decay ``m`` (``momentum``), gradient history ``h`` and update history ``s``:
    ``h = m * h + (1 - m) * g^2``; ``d = g * sqrt((s + delta) / (h + delta))``;
    ``s = m * s + (1 - m) * d^2``; ``u = r * d``. The ``s`` blobs follow the ``h`` blobs in the history."""

    type_name = "AdaDelta"
    history_sets = 2

    def compute_update_value(self, i, g, local_rate):
        m, delta = _F(self.param.momentum), _F(self.param.delta)
        h, s = self._history[i], self._history[i + len(self._history) // 2]
        h *= m
        h += (_F(1) - m) * np.square(g)
        d = g * np.sqrt((delta + s) / (delta + h))
        s *= m
        s += (_F(1) - m) * np.square(d)
        return local_rate * d


class AdamSolver(Solver):
    """Adam with ``b1`` = ``momentum``, ``b2`` = ``momentum2``, ``eps`` = ``delta``, ``t = iter + 1``:
    ``m = b1 * m + (1 - b1) * g``; ``v = b2 * v + (1 - b2) * g^2``;
    ``u = r * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (the correction in double, as Caffe).
    The ``v`` blobs follow the ``m`` blobs in the history."""

    type_name = "Adam"
    history_sets = 2

    def compute_update_value(self, i, g, local_rate):
        b1, b2 = _F(self.param.momentum), _F(self.param.momentum2)
        m, v = self._history[i], self._history[i + len(self._history) // 2]
        t = self._iter + 1
        correction = _F(np.sqrt(1.0 - np.float64(b2) ** t) / (1.0 - np.float64(b1) ** t))
        m *= b1
        m += (_F(1) - b1) * g
        v *= b2
        v += (_F(1) - b2) * (g * g)
        return (local_rate * correction) * (m / (np.sqrt(v) + _F(self.param.delta)))


SOLVERS = {cls.type_name: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver,
                                          AdamSolver)}


def get_solver(param_file, *, progress: bool | None = None) -> Solver:
    """The solver the prototxt's ``type`` (or legacy ``solver_type``) names, as pycaffe's ``get_solver``."""
    param = read_solver_param(param_file)
    return SOLVERS[param.type](param_file, progress=progress)


def _fmt(x) -> str:
    """A float32 as glog prints it (6 significant digits)."""
    return f"{float(x):.6g}"


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "RMSPropSolver", "SGDSolver", "Solver",
           "get_solver"]
