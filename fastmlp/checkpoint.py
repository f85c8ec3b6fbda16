"""Checkpoints of a fit: the whole training state in one checksummed ``.npz`` file (no pickle).

A checkpoint holds the parameters, the optimizer state, the step and epoch
counters, the shuffling generator's state, the dropout seed, the history and
the state of every callback and of the schedule, plus a *signature* of the run
(network, data fingerprint, batch size, epochs and hyper-parameters).  Its JSON
metadata and every array are covered by a SHA-256 checksum, so a damaged or
edited file is refused; resuming with other data, hyper-parameters or seed is
refused with a message naming what differs.  Written atomically by
:func:`fastmlp._io.atomic_write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp._io import atomic_write, check_output_path, read_npz
from fastmlp.backends.contract import OptimizerState
from fastmlp.history import History

if TYPE_CHECKING:
    from fastmlp.training import _Run

__all__ = ["Checkpoint", "data_fingerprint"]

FORMAT = "fastmlp-checkpoint"
VERSION = 2
_MEMBER = re.compile(r"^(meta|checksum|W\d+|b\d+|s[Wb]\d+_\d+|cb\d+_[A-Za-z0-9_]+)$")


def data_fingerprint(X: np.ndarray, Y: np.ndarray, sw: np.ndarray | None) -> str:
    """A short digest of the training data: shapes, dtypes, the targets and up to 4096 evenly spaced rows of X."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((X.shape, X.dtype.str, Y.shape, Y.dtype.str)).encode())
    rows = np.unique(np.linspace(0, X.shape[0] - 1, num=min(X.shape[0], 4096)).astype(np.int64))
    h.update(np.ascontiguousarray(X[rows]).tobytes())
    h.update(np.ascontiguousarray(Y).tobytes())
    if sw is not None:
        h.update(np.ascontiguousarray(sw).tobytes())
    return h.hexdigest()


def _checksum(meta: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Python ints/floats from numpy scalars inside a JSON-ready structure."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


class Checkpoint:
    """The checkpoint file of one fit (see the module docstring).

    Parameters
    ----------
    path : path
        Where to write; its directory must exist and be writable (checked now).
    every : int
        Epochs between checkpoints (the last epoch and a stop are always written).
    """

    def __init__(self, path: str | os.PathLike[str], every: int) -> None:
        self.path = check_output_path(path, "checkpoint")
        self.every = int(every)
        self.signature: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, every={self.every})"

    def due(self, done: int, epochs: int) -> bool:
        """Whether to write after ``done`` epochs of a fit of ``epochs``."""
        return done % self.every == 0 or done == epochs

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def bind(self, run: _Run, epochs: int, signature_extra: dict[str, Any]) -> None:
        """Fix the signature of ``run``: what a checkpoint must match to be resumed."""
        net, data, plan = run.net, run.data, run.plan
        self.signature = _jsonable({
            "layers": list(net.layers), "activation": net.activation, "output": net.output, "loss": net.loss,
            "dtype": net.dtype.name, "n": data.n, "batch_size": plan.batch_size, "epochs": epochs,
            "target": data.target, "data": data_fingerprint(data.X, data.Y, data.sw),
            "validation": None if data.Xv is None else data_fingerprint(data.Xv, data.Yv, data.swv),  # type: ignore[arg-type]
            **signature_extra,
        })  # fmt: skip

    # ------------------------------------------------------------------ write
    def save(self, run: _Run, epochs_done: int) -> None:
        """Write the state of ``run`` after ``epochs_done`` epochs of this fit, atomically."""
        net = run.net
        state: OptimizerState = net.optimizer_state_  # type: ignore[assignment]
        arrays: dict[str, np.ndarray] = {}
        for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
            arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        for s in range(len(state.weights)):
            for i, (W, b) in enumerate(zip(state.weights[s], state.biases[s], strict=True)):
                arrays[f"sW{s}_{i}"], arrays[f"sb{s}_{i}"] = W, b
        cb_states = []
        for j, cb in enumerate(run.cbs):
            js, arrs = cb.state_dict()
            cb_states.append({"type": type(cb).__name__, "state": js})
            for k, a in arrs.items():
                arrays[f"cb{j}_{k}"] = np.asarray(a)
        sched = run.lr.state_dict() if hasattr(run.lr, "state_dict") else None
        meta = {
            "format": FORMAT, "version": VERSION, "signature": self.signature, "epochs_done": int(epochs_done),
            "step": int(net.step_), "epochs_total": int(net.epochs_), "rng": run.rng.bit_generator.state,
            "mask_seed": int(run.plan.seed), "optimizer": {"kind": state.kind, "t": int(state.t)},
            "history": run.hist.to_json(), "callbacks": cb_states, "schedule": sched,
        }  # fmt: skip
        meta_bytes = json.dumps(_jsonable(meta), sort_keys=True, allow_nan=True).encode()
        digest = _checksum(meta_bytes, arrays)

        def write(fh: Any) -> None:
            np.savez(fh, meta=np.frombuffer(meta_bytes, dtype=np.uint8), checksum=np.array(digest), **arrays)

        atomic_write(self.path, write)

    # ------------------------------------------------------------------ read
    def _read(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        sizes = self.signature.get("layers", [])
        n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        itemsize = 8
        # parameters, up to two optimizer slots and one copy per callback, plus a generous allowance for the JSON
        limit = 64 * 2**20 + 8 * n_params * itemsize + 16 * int(self.signature.get("epochs", 1)) * 2**10
        arrays = read_npz(self.path, lambda name: bool(_MEMBER.match(name)), limit, "fastmlp checkpoint",
                          required=("meta", "checksum"))  # fmt: skip
        try:
            meta_bytes = arrays.pop("meta").astype(np.uint8).tobytes()
            digest = str(arrays.pop("checksum"))
            if _checksum(meta_bytes, arrays) != digest:
                raise ValueError("its checksum does not match its contents (damaged or edited)")
            meta = json.loads(meta_bytes)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("it is not a fastmlp checkpoint")
            if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
                raise ValueError(f"it was written by a newer fastmlp (format {meta.get('version')!r}); upgrade fastmlp")
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError, OverflowError) as exc:
            raise ValueError(f"{self.path} is not a usable fastmlp checkpoint: {exc}") from None
        return meta, arrays

    def load(self, run: _Run) -> int:
        """Restore ``run`` from the file; return the epochs of the fit already done.

        Raises
        ------
        ValueError
            For a damaged file, or one written for another run (the message names what differs).
        """
        meta, arrays = self._read()
        theirs = meta.get("signature", {})
        diff = [k for k in sorted(set(theirs) | set(self.signature)) if theirs.get(k) != self.signature.get(k)]
        if diff:
            what = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, this run {self.signature.get(k)!r}" for k in diff)
            raise ValueError(f"{self.path} was written by a different run ({what}); delete it or give another "
                             "checkpoint path to start afresh")  # fmt: skip
        try:
            return self._restore(run, meta, arrays)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise ValueError(f"{self.path} is not a usable fastmlp checkpoint: {type(exc).__name__}: {exc}") from None

    def _restore(self, run: _Run, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> int:
        net = run.net
        L = len(net.weights)
        done = int(meta["epochs_done"])
        if not 0 <= done <= int(self.signature["epochs"]):
            raise ValueError(f"epochs_done={done} is outside 0..{self.signature['epochs']}")
        step, total = int(meta["step"]), int(meta["epochs_total"])
        if step < 0 or total < done:
            raise ValueError("negative counters")
        opt = meta["optimizer"]
        if opt["kind"] != run.plan.optimizer:
            raise ValueError(f"it holds {opt['kind']!r} state but this run uses {run.plan.optimizer!r}")
        state = OptimizerState.zeros(run.plan.optimizer, net.layers, net.dtype)
        for s in range(len(state.weights)):
            for i in range(L):
                state.weights[s][i][...] = _exact(arrays[f"sW{s}_{i}"], state.weights[s][i])
                state.biases[s][i][...] = _exact(arrays[f"sb{s}_{i}"], state.biases[s][i])
        state.t = int(opt["t"])
        if state.t < 0:
            raise ValueError("negative optimizer step count")
        cbs = meta["callbacks"]
        if len(cbs) != len(run.cbs) or any(c["type"] != type(cb).__name__ for c, cb in zip(cbs, run.cbs)):
            raise ValueError(f"it holds callbacks {[c['type'] for c in cbs]} but this run has "
                             f"{[type(cb).__name__ for cb in run.cbs]}")  # fmt: skip
        hist = History.from_json(meta["history"])
        hist.interrupted = False  # this run goes on from the checkpoint
        if len(hist.epoch) != done:
            raise ValueError(f"its history has {len(hist.epoch)} epochs but it says {done} were done")
        net.set_params([_exact(arrays[f"W{i}"], net.weights[i]) for i in range(L)],
                       [_exact(arrays[f"b{i}"], net.biases[i]) for i in range(L)])  # fmt: skip
        net.optimizer_state_ = state
        net.step_, net.epochs_ = step, total
        run.rng.bit_generator.state = meta["rng"]
        for j, (c, cb) in enumerate(zip(cbs, run.cbs, strict=True)):
            prefix = f"cb{j}_"
            cb.load_state_dict(c["state"], {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        if meta.get("schedule") is not None and hasattr(run.lr, "load_state_dict"):
            run.lr.load_state_dict(meta["schedule"])
        if int(meta["mask_seed"]) != run.plan.seed:
            run.replan(seed=int(meta["mask_seed"]))
        run.hist.__dict__.update(hist.__dict__)
        if hist.stopped_epoch is not None:  # the checkpointed run had stopped early
            return int(self.signature["epochs"])
        return done


def _exact(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    if a.shape != like.shape or a.dtype != like.dtype:
        raise ValueError(f"an array of shape {a.shape} and dtype {a.dtype} where {like.shape} {like.dtype} belongs")
    return a

