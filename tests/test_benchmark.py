"""fastmlp.benchmark helpers (the timed runs themselves are exercised by CI's `fastmlp bench --quick`)."""

import pytest

from fastmlp import benchmark


def test_training_flops_counts_forward_gradient_and_upper_deltas():
    # 784-50-10: forward 2*(784*50 + 50*10), weight gradients the same, the delta of layer 2 only
    assert benchmark.training_flops((784, 50, 10)) == 4 * (784 * 50 + 50 * 10) + 2 * (50 * 10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_peaks_are_positive_and_simd_only_with_its_build(dtype):
    assert benchmark.gemm_peak(dtype, n=128, repeats=1) > 0
    peak = benchmark.simd_gemm_peak(dtype, n=64, repeats=1)
    try:
        from fastmlp.backends import cython as cy
    except ImportError:
        assert peak is None
        return
    assert (peak is not None) == cy.SIMD_GEMM
    assert peak is None or peak > 0


def test_bench_sections_flag_picks_the_tables(monkeypatch):
    """``fastmlp bench --sections`` hands run() the sections asked for ('none': the training table only)."""
    from fastmlp import benchmark, cli

    seen = []
    monkeypatch.setattr(benchmark, "run", lambda **kw: seen.append(kw["sections"]))
    for arg, want in (("none", ()), ("all", benchmark.SECTIONS), ("fit, predict", ("fit", "predict"))):
        assert cli.main(["bench", "--quick", "--sections", arg]) == 0
        assert seen[-1] == want
