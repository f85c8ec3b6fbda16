# AVX2 + FMA build of the kernels (compiled with -mavx2 -mfma, loaded only on CPUs that have both);
# see _kernels.pxi.
include "_kernels.pxi"
