"""Shared test helpers: the one per-dtype tolerance table, random inputs, and a mismatch reporter."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype of the tensor under test; the oracle runs in float64.
# bf16 has 8 mantissa bits (eps 7.8e-3); inputs are upcast right after load and accumulate in fp32.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = "",
                 scale: float | None = None):
    """Compares ``actual`` with a (float64) ``expected`` using the table entry for ``dtype``.

    Errors are relative to a magnitude (``scale``, default max |expected|, at least 1), since a GEMM's
    rounding error grows with Σ|terms|, not with each output element; pass the result of the same
    problem on absolute values as ``scale`` where terms may cancel.
    The message names the worst element and any NaN/Inf positions.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    bad_a = ~torch.isfinite(a)
    if bad_a.any():
        pos = bad_a.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_a.sum())} non-finite values (NaN/Inf, e.g. unwritten output) "
                             f"at {pos}{'...' if bad_a.sum() > 5 else ''}")
    if e.numel() == 0:
        return
    mag = max(1.0, scale if scale is not None else float(e.abs().max()))
    err = (a - e).abs()
    limit = atol * mag + rtol * e.abs()
    if not bool((err <= limit).all()):
        idx = int((err - limit).flatten().argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))
        raise AssertionError(
            f"{name}: {int((err > limit).sum())}/{err.numel()} elements differ beyond {dtype} tolerance "
            f"(atol={atol}·{mag:.3g}, rtol={rtol}); worst at {where}: got {a[where].item():.6g}, "
            f"expected {e[where].item():.6g}; max abs err {float(err.max()):.3g}")


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, generator=None, noncontiguous=False):
    """Fresh random values (never zeros). ``noncontiguous`` returns a strided view with the same values layout."""
    if noncontiguous:
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=generator, dtype=torch.float64) * scale
        return big.to(dtype=dtype, device=device)[..., ::2]
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def adam_pass(net, loss_fn, x, y, n: int, batch: int, lr: float) -> None:
    """One in-order pass of Adam (fresh state, trainable parameters only) over the first ``n`` rows of (x, y),
    ``batch`` rows a step, minimising ``loss_fn(net, (xb, yb)).mean()`` (``loss_fn`` gives per-example losses)."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    for i in range(0, n, batch):
        loss = loss_fn(net, (x[i:i + batch], y[i:i + batch])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
