"""Build script: the Cython extension(s) of fastmlp.

Compiler directives are set here, once.  ``FASTMLP_CYTHON_DEBUG=1`` builds
with bounds checking and wraparound on (for the CI debug run).
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTMLP_CYTHON_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
}

extensions = [
    Extension(
        "fastmlp._cython._kernels",
        ["fastmlp/_cython/_kernels.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
