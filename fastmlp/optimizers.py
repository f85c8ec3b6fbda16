"""Optimizers: specifications of the update the compiled epoch fuses into its update pass.

An optimizer here is a small, immutable description (kind and
hyper-parameters); the arithmetic lives in the kernels (the table in
:mod:`fastmlp.backends.contract`) and its per-parameter state
(:class:`~fastmlp.backends.contract.OptimizerState`) lives with the network,
so a second :meth:`fastmlp.Network.fit` continues where the first stopped and
checkpoints carry it.

``fit(..., optimizer=...)`` takes one of these objects or a name:

=============  ===============================================================
``"sgd"``      :class:`SGD` ``()`` -- plain minibatch SGD, the notebook's (default)
``"momentum"`` :class:`SGD` ``(momentum=0.9)``
``"nesterov"`` :class:`SGD` ``(momentum=0.9, nesterov=True)`` (scikit-learn's default SGD)
``"adam"``     :class:`Adam` ``()`` -- scikit-learn's Adam (and PyTorch's with ``eps_mode="torch"``)
``"adamw"``    :class:`AdamW` ``()`` -- PyTorch's AdamW (decoupled weight decay 0.01)
=============  ===============================================================

Examples
--------
>>> get_optimizer("nesterov")
SGD(momentum=0.9, nesterov=True)
>>> Adam(beta1=0.8).plan_fields()["beta1"]
0.8
"""

from __future__ import annotations

from typing import Any

from fastmlp import _validation as V

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "get_optimizer"]


class Optimizer:
    """Base class: ``kind`` names the kernel's update, :meth:`plan_fields` gives the plan's fields."""

    kind: str = "sgd"

    def plan_fields(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fastmlp.backends.contract.plan_epoch` for this optimizer."""
        return {"optimizer": self.kind}

    @property
    def weight_decay(self) -> float:
        """Decoupled weight decay (added to the fit's ``l2``); 0 but for :class:`AdamW`."""
        return 0.0

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class SGD(Optimizer):
    """Minibatch SGD, with optional momentum as scikit-learn defines it.

    ``v <- momentum * v - lr * g``; the step is ``v``, or with Nesterov
    ``momentum * v - lr * g``.  ``momentum=0`` is plain SGD ``-lr * g`` (the
    notebook's), with or without ``nesterov``.

    Parameters
    ----------
    momentum : float
        In ``[0, 1]``.
    nesterov : bool
        Nesterov's momentum.
    """

    def __init__(self, momentum: float = 0.0, nesterov: bool = False) -> None:
        self.momentum = V.check_float(momentum, "momentum", low=0.0, high=1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        self.nesterov = nesterov

    @property
    def kind(self) -> str:  # type: ignore[override]
        if self.momentum == 0.0:
            return "sgd"
        return "nesterov" if self.nesterov else "momentum"

    def plan_fields(self) -> dict[str, Any]:
        return {"optimizer": self.kind, "momentum": self.momentum}

    def __repr__(self) -> str:
        if self.momentum == 0.0 and not self.nesterov:
            return "SGD()"
        return f"SGD(momentum={self.momentum:g}{', nesterov=True' if self.nesterov else ''})"


class Adam(Optimizer):
    """Adam (Kingma & Ba), as scikit-learn's ``AdamOptimizer`` computes it.

    ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``; at step
    ``t`` the update is ``-lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``.
    ``eps_mode="torch"`` puts epsilon where PyTorch's ``torch.optim.Adam`` does,
    ``-(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.

    Parameters
    ----------
    beta1, beta2 : float
        Decay rates of the moment estimates, in ``[0, 1)``.
    eps : float
        Added to the denominator (> 0).
    eps_mode : {'sklearn', 'torch'}
    """

    kind = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, eps_mode: str = "sklearn") -> None:
        self.beta1 = V.check_float(beta1, "beta1", low=0.0, high=1.0, high_open=True)
        self.beta2 = V.check_float(beta2, "beta2", low=0.0, high=1.0, high_open=True)
        self.eps = V.check_float(eps, "eps", low=0.0, low_open=True)
        if eps_mode not in ("sklearn", "torch"):
            raise ValueError(f"eps_mode must be 'sklearn' or 'torch', got {eps_mode!r}")
        self.eps_mode = eps_mode

    def plan_fields(self) -> dict[str, Any]:
        return {"optimizer": self.kind, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "eps_mode": self.eps_mode}  # fmt: skip

    def __repr__(self) -> str:
        mode = "" if self.eps_mode == "sklearn" else ", eps_mode='torch'"
        return f"Adam(beta1={self.beta1:g}, beta2={self.beta2:g}, eps={self.eps:g}{mode})"


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter), as PyTorch's ``torch.optim.AdamW`` computes it.

    Each step first decays the weights, ``W <- (1 - lr * weight_decay) W``
    (biases are not decayed), then takes the Adam step with PyTorch's epsilon
    placement.  The decay is the fit's decoupled ``l2`` term: ``weight_decay``
    and ``fit(l2=...)`` add up.

    Parameters
    ----------
    beta1, beta2, eps : float
        As :class:`Adam`.
    weight_decay : float
        Decoupled decay per unit of learning rate (>= 0; PyTorch's default 0.01).
    """

    kind = "adamw"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(beta1, beta2, eps, eps_mode="torch")
        self.decay = V.check_float(weight_decay, "weight_decay", low=0.0)

    @property
    def weight_decay(self) -> float:
        return self.decay

    def __repr__(self) -> str:
        return f"AdamW(beta1={self.beta1:g}, beta2={self.beta2:g}, eps={self.eps:g}, weight_decay={self.decay:g})"


_NAMED = {
    "sgd": SGD,
    "momentum": lambda: SGD(momentum=0.9),
    "nesterov": lambda: SGD(momentum=0.9, nesterov=True),
    "adam": Adam,
    "adamw": AdamW,
}


def get_optimizer(spec: str | Optimizer | None) -> Optimizer:
    """The optimizer named ``spec`` (see the module table), or ``spec`` itself; ``None`` is plain SGD.

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything that is neither a name nor an :class:`Optimizer`.
    """
    if spec is None:
        return SGD()
    if isinstance(spec, Optimizer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"optimizer must be a name ({', '.join(map(repr, _NAMED))}) or a fastmlp.optimizers "
                        f"object such as Adam(), got {type(spec).__name__}")  # fmt: skip
    key = spec.strip().lower()
    if key not in _NAMED:
        raise ValueError(f"unknown optimizer {spec!r}; choose one of {', '.join(map(repr, _NAMED))} "
                         "or pass fastmlp.optimizers.SGD(...)/Adam(...)/AdamW(...)")  # fmt: skip
    return _NAMED[key]()
