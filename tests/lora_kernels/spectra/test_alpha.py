"""Batched eigenvalues and the vectorised Hill/KS fit against plain loops written from ALGORITHMS.md §5."""
import math

import numpy as np
import pytest
import torch

from lora_kernels.spectra import alpha as A
from tests.helpers import assert_close, randn


def loop_fit(lam: np.ndarray, mode: str, threshold: float = 0.0) -> float:
    """One spectrum, one candidate at a time (the published loop; window rules from the spec)."""
    lam = np.sort(lam[lam > max(threshold, 0.0)])
    n = len(lam)
    if mode in ("faithful", "corrected"):
        counts, edges = np.histogram(np.log10(lam), bins=100)
        peak = 10 ** edges[np.argmax(counts)]
        lo = np.log10(0.95 * peak) if mode == "faithful" else 0.95 * peak
        cand = [i for i in range(n - 1) if lo <= lam[i] <= 1.5 * peak]
    elif mode == "median":
        cand = [n // 2]
    else:
        cand = list(range(n - 1))
    alphas, Ds = np.zeros(n - 1), np.ones(n - 1)
    for i in cand:
        m = n - i
        a = 1 + m / np.sum(np.log(lam[i:] / lam[i]))
        alphas[i] = a
        if a > 1:
            Ds[i] = np.max(np.abs(1 - (lam[i:] / lam[i]) ** (1 - a) - np.arange(m) / m))
    return float(alphas[np.argmin(Ds)])


def spectra(B, n, seed=0, df=3.0):
    torch.manual_seed(seed)
    x = torch.distributions.StudentT(torch.tensor(df, dtype=torch.float64)).sample((B, n, n + 37))
    return torch.linalg.eigvalsh(x @ x.transpose(1, 2))


@pytest.mark.parametrize("shape", [(17, 33), (33, 17), (64, 64), (1, 9)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_eigenvalues_match_numpy(shape, method):
    mats = [randn(*shape, noncontiguous=True), randn(*shape, dtype=torch.float64), randn(5, 7)]
    ev = A.eigenvalues(mats, method=method)
    for w, e in zip(mats, ev):
        ref = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
        assert e.dtype == torch.float64 and e.shape == (min(w.shape),)
        assert_close(e, torch.from_numpy(ref), torch.float64, scale=float(ref.max()))
    ev32 = A.eigenvalues(mats, method=method, dtype=torch.float32)
    assert_close(ev32[0], ev[0], torch.float32, scale=float(ev[0].max()))


def test_eigenvalues_errors():
    with pytest.raises(ValueError, match="method"):
        A.eigenvalues([randn(3, 3)], method="qr")
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        A.eigenvalues([randn(3, 3), randn(3)])
    with pytest.raises(TypeError, match="dtype"):
        A.eigenvalues([randn(3, 3)], dtype=torch.float16)
    assert A.eigenvalues([]) == []


@pytest.mark.parametrize("mode", A.XMIN_MODES)
def test_hill_fit_matches_loop(mode):
    lam = spectra(5, 61)
    res = A.hill_fit(lam, mode)
    for b in range(lam.shape[0]):
        assert res["alpha"][b].item() == pytest.approx(loop_fit(lam[b].numpy(), mode), rel=1e-9)
    assert bool(res["ok"].all())


def test_hill_fit_threshold_zeros_and_tiles(monkeypatch):
    lam = spectra(3, 50, df=2.0)
    lam[0, :4] = 0.0                     # rank-deficient: exact zeros are dropped
    lam = lam.sort(1).values
    full = A.hill_fit(lam, "scan", threshold=1e-9)
    for b in range(3):
        assert full["alpha"][b].item() == pytest.approx(loop_fit(lam[b].numpy(), "scan", 1e-9), rel=1e-9)
    monkeypatch.setattr(A, "_TILE_CANDIDATES", 3)   # many tiles must give the same answer
    tiled = A.hill_fit(lam, "scan", threshold=1e-9)
    assert torch.equal(tiled["alpha"], full["alpha"]) and torch.equal(tiled["D"], full["D"])


def test_hill_fit_fp32_close_to_fp64():
    lam = spectra(4, 80)
    a64 = A.hill_fit(lam, "scan")["alpha"]
    a32 = A.hill_fit(lam.float(), "scan")["alpha"]
    assert float((a64 - a32.double()).abs().max()) < 1e-3


def test_hill_fit_edges():
    out = A.hill_fit(torch.empty(0, 5, dtype=torch.float64))
    assert out["alpha"].shape == (0,)
    with pytest.raises(ValueError, match="xmin"):
        A.hill_fit(spectra(1, 10), "peak")
    with pytest.raises(ValueError, match="sorted"):
        A.hill_fit(torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64))
    one = A.hill_fit(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))   # rank 1: flagged, no number
    assert bool(one["degenerate"][0]) and math.isnan(float(one["alpha"][0]))
    const = A.hill_fit(torch.ones(1, 10, dtype=torch.float64), "scan")   # no tail to fit
    assert not bool(const["ok"][0]) and bool(const["degenerate"][0])
    assert math.isnan(float(const["alpha"][0]))


def test_alphas_of_groups_shapes_in_order():
    mats = [randn(20, 30), randn(30, 20), randn(20, 30), randn(11, 40)]
    got = A.alphas_of(mats, xmin="scan")
    for w, a in zip(mats, got):
        ev = np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2
        assert a.item() == pytest.approx(loop_fit(ev, "scan"), rel=1e-8)


def _fast_path_mats():
    """Several shape groups (odd, tall, wide, square, 1-row), dtypes, and rank-deficient/degenerate matrices."""
    g = torch.Generator().manual_seed(3)
    low = torch.cat([torch.randn(15, 31, generator=g), torch.zeros(8, 31)])              # rank 15 of 23: zero rows
    rank1 = torch.randn(19, 1, generator=g) @ torch.randn(1, 13, generator=g)          # rank 1
    ortho = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    st = torch.distributions.StudentT(torch.tensor(2.0)).sample((2, 40, 57))           # heavy-tailed
    return [randn(17, 33), randn(33, 17), randn(17, 33, noncontiguous=True), low, rank1, ortho.float(),
            st[0], st[1].T, randn(45, 45, dtype=torch.float64), torch.zeros(6, 11),
            randn(12, 20).to(torch.bfloat16), randn(12, 20).to(torch.float16)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numpy_gram_backend_matches_torch_reference(dtype):
    # + one-eigenvalue spectra (no fit), an fp64 orthogonal matrix and a rank-2 product: the reference does not flag
    # the last two as degenerate and fits their round-off, where two LAPACKs differ, so the alpha test skips them
    d = torch.float64
    mats = _fast_path_mats() + [randn(1, 9), randn(9, 1), torch.linalg.qr(randn(16, 16, dtype=d))[0],
                                randn(23, 2, dtype=d) @ randn(2, 31, dtype=d)]
    ref = A.eigenvalues(mats, dtype=dtype, lapack="torch")
    for lapack in ("numpy", "auto"):
        got = A.eigenvalues(mats, dtype=dtype, lapack=lapack)
        for r, e in zip(ref, got):
            assert e.dtype == r.dtype == dtype and e.shape == r.shape
            assert bool((e[1:] >= e[:-1]).all()) and bool((e >= 0).all())
            assert_close(e, r, dtype, scale=max(float(r.max()), 1.0))


@pytest.mark.parametrize("xmin", A.XMIN_MODES)
def test_numpy_gram_backend_gives_the_reference_alphas(xmin):
    mats = _fast_path_mats()
    ref, ref_deg = A.alphas_of(mats, xmin=xmin, lapack="torch", return_degenerate=True)
    got, deg = A.alphas_of(mats, xmin=xmin, lapack="numpy", return_degenerate=True)
    assert torch.equal(deg, ref_deg) and bool(deg[[4, 5, 9]].all())   # rank 1, orthogonal, zero
    ok = ~ref_deg & ~ref.isnan()
    assert bool(ok.sum() >= 6) and torch.equal(got.isnan(), ref.isnan())
    assert_close(got[ok], ref[ok], torch.float64, scale=1.0)


@pytest.mark.parametrize("lapack", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_eigenvalues_nonfinite_names_the_first_bad_matrix(lapack, method):
    bad = randn(6, 9)
    bad[1, 1] = float("nan")
    worse = randn(9, 6)
    worse[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"^w1 contains NaN or Inf"):   # first in input order, any shape group
        A.eigenvalues([randn(6, 9), bad, worse], method=method, lapack=lapack, names=["w0", "w1", "w2"])
    with pytest.raises(ValueError, match=r"mats\[0\] contains NaN or Inf"):
        A.eigenvalues([worse, bad], method=method, lapack=lapack)
    with pytest.raises(ValueError, match="overflows"):           # finite entries whose squares overflow
        A.eigenvalues([torch.full((3, 4), 1e200, dtype=torch.float64)], method="gram", lapack=lapack)
    with pytest.raises(ValueError, match="lapack"):
        A.eigenvalues([randn(3, 3)], lapack="mkl")
    with pytest.raises(ValueError, match="names"):
        A.eigenvalues([randn(3, 3)], names=["a", "b"])
