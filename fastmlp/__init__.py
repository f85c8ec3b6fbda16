"""fastmlp: fast multilayer perceptrons on the CPU.

Compiled (Cython and Numba) kernels behind a small :class:`Network` class, a
pure-NumPy reference backend that defines the maths, and
:mod:`fastmlp.compat`, a drop-in for the classic NumPy MNIST training loop.
"""

from fastmlp._version import __version__
from fastmlp.backends import available_backends, get_backend
from fastmlp.callbacks import Callback, EarlyStopping
from fastmlp.network import Network
from fastmlp.training import History, fit

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "Network",
    "__version__",
    "available_backends",
    "fit",
    "get_backend",
]
