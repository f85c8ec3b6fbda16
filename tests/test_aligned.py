"""The compiled backends' aligned work buffers (fastmlp.backends._aligned)."""

from __future__ import annotations

import numpy as np
import pytest

from fastmlp.backends._aligned import ALIGN, empty_aligned


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
@pytest.mark.parametrize("shape", [0, 1, 7, (3,), (0, 5), (5, 0), (13, 17), (2, 3, 5), (1000, 784)])
def test_empty_aligned_starts_on_a_line_with_the_shape_asked(shape, dtype):
    want = (shape,) if isinstance(shape, int) else shape
    for _ in range(4):  # several allocations: NumPy's own offsets vary
        a = empty_aligned(shape, dtype)
        assert a.shape == want and a.dtype == np.dtype(dtype)
        assert a.flags.c_contiguous and a.flags.writeable
        if a.size:
            assert a.ctypes.data % ALIGN == 0
        a[...] = 1  # every element of the view can be written and read back
        assert np.all(a == 1)


def test_empty_aligned_zero_fills_and_accepts_numpy_integers():
    for _ in range(8):  # dirty memory first, so that a fill left out shows up in the reused block
        junk = empty_aligned((9, 31), "float32")
        junk[...] = 7.0
        del junk
        a = empty_aligned((np.int64(9), np.int32(31)), "float32", zero=True)
        assert a.shape == (9, 31) and not a.any()
        assert a.ctypes.data % ALIGN == 0


def test_empty_aligned_rejects_negative_dimensions():
    with pytest.raises(ValueError, match="negative"):
        empty_aligned((4, -1), np.float64)
