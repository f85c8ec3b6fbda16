"""fastmlp: fast multilayer perceptrons on the CPU.

Compiled (Cython and Numba) kernels behind a small ``Network`` class, a pure
NumPy reference backend that defines the maths, and :mod:`fastmlp.compat`, a
drop-in for the classic NumPy MNIST training loop.
"""

from fastmlp._version import __version__
from fastmlp.backends import available_backends, get_backend

__all__ = ["__version__", "available_backends", "get_backend"]
