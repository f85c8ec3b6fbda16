"""Private Numba kernels of the ``numba`` backend (see :mod:`fastmlp._numba.kernels`); import nothing here eagerly."""
