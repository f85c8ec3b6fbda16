"""fastmlp: fast multilayer perceptrons on the CPU.

Compiled (Cython and Numba) kernels behind a small :class:`Network` class, a
pure-NumPy reference backend that defines the maths, and
:mod:`fastmlp.compat`, a drop-in for the classic NumPy MNIST training loop.
"""

from fastmlp._version import __version__
from fastmlp.backends import available_backends, get_backend
from fastmlp.callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint
from fastmlp.history import History
from fastmlp.lr_finder import LRFinderResult, lr_find
from fastmlp.mc_dropout import MCPrediction
from fastmlp.network import Network
from fastmlp.optimizers import SGD, Adam, AdamW
from fastmlp.schedules import (
    Constant,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    ReduceLROnPlateau,
    Schedule,
    StepLR,
)
from fastmlp.training import fit

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "CSVLogger",
    "Callback",
    "Constant",
    "CosineAnnealingLR",
    "EarlyStopping",
    "ExponentialLR",
    "History",
    "LRFinderResult",
    "LinearLR",
    "MCPrediction",
    "ModelCheckpoint",
    "Network",
    "ReduceLROnPlateau",
    "Schedule",
    "StepLR",
    "__version__",
    "available_backends",
    "fit",
    "get_backend",
    "lr_find",
]
