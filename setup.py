"""Build script: the Cython extensions of fastmlp.

The kernels (``fastmlp/backends/cython/_kernels.pxi``) are compiled three times:

``fastmlp.backends.cython._kernels``
    baseline ISA of the platform (SSE2 on x86-64, the base ISA elsewhere): runs on any CPU.
``fastmlp.backends.cython._kernels_avx2``
    ``-mavx2 -mfma`` (x86 only); :mod:`fastmlp.backends.cython` loads it only on
    a CPU that has AVX2 and FMA.  Not built elsewhere, nor where the compiler rejects the flags.
``fastmlp.backends.cython._kernels_avx512``
    ``-mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma`` (x86 only), with
    its own matrix kernels (``_simd_gemm.h``) instead of BLAS; loaded only on a
    CPU with those extensions.  Not built elsewhere, nor where the compiler rejects the flags.

All use ``-O3 -ffast-math`` and link glibc's ``libmvec`` so that gcc turns the
sigmoid's ``exp`` into a vectorized call (docs/packaging.md); ``tanh`` is the kernels' own,
built from that ``exp`` (libmvec's vector ``tanh`` needs glibc 2.35, the wheels stay
at manylinux_2_28/2_31).  ``-ffast-math`` is a *compile* flag only: given at link
time, gcc < 13 links ``crtfastmath.o``, which switches on flush-to-zero for the whole
process when the module is imported.  Where ``libmvec`` is missing the kernels are
built without ``-ffast-math`` (scalar ``exp``, still correct).

OpenMP is optional: it is used when the compiler accepts ``-fopenmp``
(``FASTMLP_OPENMP=0`` turns it off).  Compiler directives are set here, once.

Release builds carry no debug information (``-g0``, and ``-s`` on Linux: 0.5 MB a module instead of 2.5 MB).
``FASTMLP_CYTHON_DEBUG=1`` builds with bounds checking and wraparound on and keeps
``-g`` (for the CI debug run).

The compiled kernels are optional: without a working C compiler (or when one
extension fails to compile) the package installs without them, the ``cython``
backend reports why it is unavailable (``fastmlp info``), and the ``numba`` and
``numpy`` backends work.  ``FASTMLP_REQUIRE_CYTHON=1`` makes such a failure an
error instead (wheel builds and CI set it).  The three extensions compile in
parallel (``build_ext -j``; default: the number of CPUs, ``FASTMLP_BUILD_JOBS``
sets it).
"""

import os
import platform
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTMLP_CYTHON_DEBUG", "") not in ("", "0")
WANT_OPENMP = os.environ.get("FASTMLP_OPENMP", "1") not in ("0", "")
REQUIRE = os.environ.get("FASTMLP_REQUIRE_CYTHON", "") not in ("", "0")
#: the AVX variants exist on x86 only; elsewhere (aarch64, ppc64le, ...) only the baseline build is made
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
#: written beside the kernels when some could not be compiled; fastmlp.backends.cython quotes it
NOT_BUILT = "NOT_BUILT.txt"
PACKAGE = "fastmlp.backends.cython"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
}

_PROBE_OPENMP = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += omp_get_num_threads() > 0;
    return n > 0 ? 0 : 1;
}
"""

# a loop gcc vectorizes into a libmvec call under -ffast-math; linking an executable
# proves that the vector exp resolves (a shared object would link with it undefined)
_PROBE_MVEC = r"""
#include <math.h>
float x[64];
int main(void) {
    for (int i = 0; i < 64; i++) x[i] = expf(x[i] * 0.5f);
    for (int i = 0; i < 64; i++) x[i] = (float)exp((double)x[i]);
    return x[0] > 0.0f ? 0 : 1;
}
"""

_PROBE_EMPTY = "int main(void) { return 0; }\n"

# the intrinsics _simd_gemm.h uses, so that an assembler or compiler too old for them drops the variant
_PROBE_AVX512 = r"""
#include <immintrin.h>
int main(void) {
    float x[16] = {0};
    __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_set1_ps(2.0f), _mm512_maskz_loadu_ps(3, x));
    __m512d d = _mm512_fmadd_pd(_mm512_loadu_pd((double *)x), _mm512_set1_pd(2.0), _mm512_setzero_pd());
    return (int)(_mm512_reduce_add_ps(v) + _mm512_reduce_add_pd(d));
}
"""


def _probe(compiler, source, cflags, ldflags=(), libraries=(), errors=None):
    """Whether ``compiler`` compiles and links ``source`` with these flags (the failure appended to ``errors``)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
        try:
            os.dup2(devnull, 2)  # the compiler's complaints about a failed probe are expected noise
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=list(cflags))
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=list(ldflags),
                                     libraries=list(libraries))  # fmt: skip
        except Exception as exc:  # any failure means "not supported"
            if errors is not None:
                errors.append(f"{type(exc).__name__}: {exc}")
            return False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    return True


class BuildExt(build_ext):
    """Probes the compiler once, then sets each extension's ISA, math and OpenMP flags; a missing compiler or
    a failed extension is reported (and recorded beside the package) instead of failing the install."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            jobs = os.environ.get("FASTMLP_BUILD_JOBS", "").strip()
            self.parallel = int(jobs) if jobs else (os.cpu_count() or 1)

    def _kernel_dir(self):
        if self.inplace:
            return self.get_finalized_command("build_py").get_package_dir(PACKAGE)
        return os.path.join(self.build_lib, *PACKAGE.split("."))

    def _record(self, failures):
        """Write (or remove) the NOT_BUILT note that the cython backend quotes when it cannot load."""
        path = os.path.join(self._kernel_dir(), NOT_BUILT)
        if not failures:
            if os.path.exists(path):
                os.remove(path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(f"{what}: {why}\n" for what, why in failures))

    def _skip(self, what, why):
        if REQUIRE:
            raise RuntimeError(f"fastmlp build: {what}: {why} (FASTMLP_REQUIRE_CYTHON is set)")
        print(f"fastmlp build: WARNING: {what}: {why}; fastmlp installs without it (the cython backend then says "
              "why it is unavailable; numba and numpy work)", file=sys.stderr)  # fmt: skip
        self._failures.append((what, why))

    def build_extensions(self):
        self._failures = []
        cc = self.compiler
        errors = []
        if cc.compiler_type != "msvc" and not _probe(cc, _PROBE_EMPTY, [], errors=errors):
            self._skip("no working C compiler", "; ".join(errors) or "the compiler test failed")
            self.extensions = []
            self._record(self._failures)
            return
        if cc.compiler_type == "msvc":
            base, avx2, mvec, omp = ["/O2"], ["/arch:AVX2"], False, (["/openmp"], [])
            avx512 = ["/arch:AVX512"]
            have_avx2 = have_avx512 = X86
            have_omp = WANT_OPENMP
        else:
            base = ["-O3", "-g" if DEBUG else "-g0"]
            avx2 = ["-mavx2", "-mfma"]
            avx512 = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", *avx2]
            mvec = _probe(cc, _PROBE_MVEC, ["-O3", "-ffast-math"], libraries=["mvec", "m"])
            have_avx2 = X86 and _probe(cc, _PROBE_EMPTY, avx2)
            have_avx512 = have_avx2 and _probe(cc, _PROBE_AVX512, ["-O2", *avx512])
            if have_avx2 and mvec:
                mvec = _probe(cc, _PROBE_MVEC, ["-O3", "-ffast-math", *avx2], libraries=["mvec", "m"])
            if have_avx512 and mvec:  # the AVX-512 build calls libmvec's 512-bit variants
                have_avx512 = _probe(cc, _PROBE_MVEC, ["-O3", "-ffast-math", *avx512], libraries=["mvec", "m"])
            omp = (["-fopenmp"], ["-fopenmp"])
            have_omp = WANT_OPENMP and _probe(cc, _PROBE_OPENMP, *omp)
        fast = ["-ffast-math"] if mvec else ["-fno-math-errno"]
        print(f"fastmlp build: {platform.machine()}, OpenMP {'on' if have_omp else 'off'}, libmvec {'on' if mvec else 'off'}, "
              f"AVX2 variant {'on' if have_avx2 else 'off'}, AVX-512 variant {'on' if have_avx512 else 'off'}, "
              f"debug info {'on' if DEBUG else 'off'}, {self.parallel} jobs", file=sys.stderr)  # fmt: skip
        keep = []
        for ext in self.extensions:
            variants = {"_kernels_avx2": (avx2, have_avx2), "_kernels_avx512": (avx512, have_avx512)}
            isa, have = variants.get(ext.name.rsplit(".", 1)[-1], ([], True))
            if not have:
                continue
            ext.extra_compile_args = [*base, *fast, *isa]
            ext.extra_link_args = []
            if mvec:
                ext.libraries = [*ext.libraries, "mvec", "m"]
            if have_omp:
                ext.extra_compile_args += omp[0]
                ext.extra_link_args += omp[1]
            if not DEBUG and sys.platform.startswith("linux"):
                ext.extra_link_args.append("-s")  # no symbol table either (the exported PyInit_ stays)
            keep.append(ext)
        # cythonized only now, so that an sdist, or an install without a compiler, does not translate them
        from Cython.Build import cythonize

        translated = {e.name: e.sources for e in cythonize(keep, compiler_directives=directives, quiet=True)}
        for ext in keep:  # the same Extension objects: setuptools has set its own attributes on them
            ext.sources = translated[ext.name]
        self.extensions = keep
        super().build_extensions()
        failed = {what.split(" ", 1)[0] for what, _ in self._failures}
        self.extensions = [ext for ext in self.extensions if ext.name not in failed]  # nothing to copy or install
        self._record(self._failures)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compiler error of one variant: the others still load
            self._skip(f"{ext.name} did not compile", f"{type(exc).__name__}: {exc}")


def _ext(name, source):
    import numpy as np

    return Extension(
        name,
        [source],
        include_dirs=[np.get_include(), "fastmlp/backends/cython"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("FASTMLP_DEBUG_BUILD", "1" if DEBUG else "0")],
        depends=[f"fastmlp/backends/cython/{f}" for f in ("_kernels.pxi", "_simd_gemm.h", "_simd_gemm_t.h")],
    )


extensions = [
    _ext("fastmlp.backends.cython._kernels", "fastmlp/backends/cython/_kernels.pyx"),
    _ext("fastmlp.backends.cython._kernels_avx2", "fastmlp/backends/cython/_kernels_avx2.pyx"),
    _ext("fastmlp.backends.cython._kernels_avx512", "fastmlp/backends/cython/_kernels_avx512.pyx"),
]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
