"""Compiled Cython kernels of fastmlp (``_kernels`` baseline ISA, ``_kernels_avx2`` AVX2+FMA).

Use them through :mod:`fastmlp.backends.cython`, which picks the variant for
this CPU, or better through ``fastmlp.get_backend("cython")``, which validates.
"""
