# Baseline-ISA build of the kernels (runs on any CPU of the platform); see _kernels.pxi.
include "_kernels.pxi"
