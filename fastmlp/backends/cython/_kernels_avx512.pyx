# AVX-512 build of the kernels (compiled with -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma, loaded
# only on CPUs that have them). Unlike the other builds it does its matrix products with its own register-tiled
# kernels (_simd_gemm.h) instead of SciPy's BLAS; see _kernels.pxi.
include "_kernels.pxi"
