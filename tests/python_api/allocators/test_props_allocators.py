"""Property tests (hypothesis) for the allocators' public entry points: each call either raises an error of the
documented type that names the bad argument (or module), or returns a result with the promised invariants:
allocators terminate, counts are non-negative integers summing to the budget, nothing is NaN without a warning.
Case counts come from the profiles in tests/conftest.py (ci: 200 per test; HYPOTHESIS_PROFILE=nightly: 2000)."""
import contextlib
import math
import re
import signal
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import python_api as lk
from lora_kernels.spectra.alpha import XMIN_MODES
from python_api.allocators.alphalora import MAX_TOTAL, allocate_experts, alpha_hill, layer_alphas
from python_api.allocators.sensitivity import SensitivityTracker
from python_api.allocators.shaplora import allocate_ranks, shapley_sensitivity

NAN, INF = float("nan"), float("inf")
SPECIAL = [NAN, INF, -INF]
quiet = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def must_return_within(seconds: float):
    """Fails the example (instead of hanging the suite) if the call does not terminate."""
    def boom(*_):
        raise TimeoutError(f"did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def recorded():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield w


def runtime_warnings(rec) -> str:
    return "\n".join(str(w.message) for w in rec if issubclass(w.category, RuntimeWarning))


# ---- allocate_ranks ------------------------------------------------------------------------------------------
finite_or_nan = st.one_of(st.floats(-1e6, 1e6), st.just(0.0), st.just(NAN))
score = st.one_of(finite_or_nan, st.sampled_from([INF, -INF]))
module_scores = st.one_of(st.lists(finite_or_nan, max_size=6), st.lists(score, max_size=6))


@quiet
@given(scores=st.dictionaries(st.sampled_from(["a", "b.q", "c.v"]), module_scores, min_size=1, max_size=3),
       budget=st.integers(-2, 20), by=st.sampled_from(["signed", "abs"]))
def test_allocate_ranks(scores, budget, by):
    sc = {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
    inf_mods = [k for k, v in scores.items() if any(math.isinf(x) for x in v)]
    n_valid = sum(not math.isnan(x) for v in scores.values() for x in v)
    with must_return_within(10):
        if inf_mods:
            event("ValueError: ±Inf score")
            with pytest.raises(ValueError, match=re.escape(repr(inf_mods[0]))):
                allocate_ranks(sc, budget, by=by)
            return
        if not 0 <= budget <= n_valid:
            event("ValueError: budget")
            with pytest.raises(ValueError, match="budget"):
                allocate_ranks(sc, budget, by=by)
            return
        masks = allocate_ranks(sc, budget, by=by)
    event("masks" + (" (with NaN scores)" if n_valid < sum(len(v) for v in scores.values()) else ""))
    assert list(masks) == list(sc)
    assert sum(int(m.sum()) for m in masks.values()) == budget
    key = {k: (v.abs() if by == "abs" else v) for k, v in sc.items()}
    kept = [float(key[k][i]) for k, m in masks.items() for i in m.nonzero().flatten().tolist()]
    dropped = [float(key[k][i]) for k, m in masks.items() for i in (~m).nonzero().flatten().tolist()
               if not math.isnan(float(sc[k][i]))]
    assert not any(math.isnan(x) for x in kept)                       # a NaN (not a candidate) is never kept
    assert not kept or not dropped or min(kept) >= max(dropped)       # the global top-budget


# ---- allocate_experts -----------------------------------------------------------------------------------------
good_alpha = st.one_of(st.floats(0.5, 10.0), st.floats(1e-300, 1e300))
alpha = st.one_of(good_alpha, st.sampled_from([0.0, -1.0, NAN, INF]))
alpha_lists = st.one_of(st.lists(good_alpha, min_size=1, max_size=12), st.lists(good_alpha, min_size=1, max_size=12),
                        st.lists(alpha, max_size=12))
total = st.one_of(st.integers(-2, 300), st.integers(0, 300).map(np.int64), st.sampled_from([MAX_TOTAL + 1, 4.0, True]))
beta = st.one_of(st.floats(-20.0, 20.0), st.floats(0.0, 20.0), st.floats(0.0, 3000.0), st.sampled_from([NAN, INF]))


def published(values, target, b):
    """AlphaLoRA's exponential_scaling, with an iteration cap (it may run away on degenerate input)."""
    s = np.power(np.asarray(values, dtype=np.float64), b)
    n = np.round(s / s.sum() * target).astype(int)
    for _ in range(10 * len(values) + 10):
        if n.sum() == target:
            return n.tolist()
        if target > n.sum():
            n[np.argmin(s - n)] += 1
        else:
            n[np.argmax(s - n)] -= 1
    return None


@quiet
@given(alphas=alpha_lists, total=total, beta=beta,
       repair=st.sampled_from(["faithful", "largest_remainder"]), min_experts=st.integers(-1, 4))
def test_allocate_experts(alphas, total, beta, repair, min_experts):
    L = len(alphas)
    bad_type = {"total"} if isinstance(total, (bool, float)) else set()
    bad = set()
    if L == 0 or not all(math.isfinite(a) and a > 0 for a in alphas):
        bad.add("alphas")
    if not bad_type and not 0 <= total <= MAX_TOTAL:
        bad.add("total")
    if min_experts < 0:
        bad.add("min_experts")
    elif not bad_type and L and total < L * min_experts:
        bad |= {"total", "min_experts"}
    if not math.isfinite(beta):
        bad.add("beta")
    with must_return_within(5):
        try:
            n = allocate_experts(alphas, total, beta=beta, repair=repair, min_experts=min_experts)
        except TypeError as e:
            event("TypeError")
            assert bad_type and any(a in str(e) for a in bad_type), (bad_type, e)
            return
        except ValueError as e:
            event(f"ValueError: {sorted(bad)}")
            assert bad and any(a in str(e) for a in bad), (bad, e)
            return
    assert not bad and not bad_type, (bad, bad_type, n)
    event(f"counts ({repair})")
    assert len(n) == L and all(type(v) is int and v >= min_experts for v in n) and sum(n) == int(total)
    a = np.asarray(alphas)
    logw = beta * np.log(a)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    if repair == "largest_remainder":                                  # each count within 1 of its quota
        q = min_experts + w * (int(total) - L * min_experts)
        assert np.all(np.abs(np.asarray(n) - q) < 1 + 1e-9), (n, q)
    elif min_experts == 0:
        with np.errstate(all="ignore"):
            s = a ** beta
        ref = published(alphas, int(total), beta) if np.all(np.isfinite(s)) and np.all(s >= 1e-300) else None
        if ref is not None and min(ref) >= 0:                          # the published loop, where it is sound
            event("counts == published loop")
            assert n == ref, (n, ref)


# ---- alpha_hill -------------------------------------------------------------------------------------------
eig = st.one_of(st.floats(0.0, 1e6), st.sampled_from([0.0, 1.0, 2.0, 1e-300]), st.floats(-1.0, 0.0))
eigs = st.one_of(st.lists(eig, max_size=40),
                 st.tuples(st.floats(1e-6, 1e6), st.integers(0, 40)).map(lambda t: [t[0]] * t[1]),   # constant
                 st.lists(eig, min_size=2, max_size=10).map(lambda v: v + [st_special(len(v))]))


def st_special(i):
    return SPECIAL[i % 3]


@quiet
@given(ev=eigs, xmin=st.sampled_from(XMIN_MODES), as_numpy=st.booleans())
def test_alpha_hill(ev, xmin, as_numpy):
    arg = np.asarray(ev, dtype=np.float64) if as_numpy else ev
    with must_return_within(10), recorded() as rec:
        if len(ev) < 2 or not all(math.isfinite(x) for x in ev):
            event("ValueError")
            with pytest.raises(ValueError, match="eigenvalues"):
                alpha_hill(arg, xmin=xmin)
            return
        # λ = σ² ≥ 0: a negative value beyond round-off (√ε of the largest |λ|, ε the coarser of float32's, the
        # default eps, and the input's dtype's) is refused; a tiny negative is ignored like any λ ≤ threshold
        t = torch.as_tensor(arg)
        tol = math.sqrt(max(torch.finfo(torch.float32).eps, torch.finfo(t.dtype).eps))
        if float(t.min()) < -tol * float(t.abs().max()):
            event("ValueError (negative)")
            with pytest.raises(ValueError, match="σ² ≥ 0"):
                alpha_hill(arg, xmin=xmin)
            return
        a = alpha_hill(arg, xmin=xmin, name="w")
    assert isinstance(a, float) and not math.isinf(a)
    event("NaN + warning" if math.isnan(a) else ("0.0 (no fit)" if a == 0.0 else "alpha > 1"))
    if math.isnan(a):
        assert "'w'" in runtime_warnings(rec)                          # never NaN silently
    elif xmin == "faithful":
        assert a == 0.0 or a > 1.0                                     # 0.0: the published no-fit fallback
    else:
        assert a > 1.0
    if len(set(x for x in ev if x > 0)) == 1:                          # a constant spectrum has no power law
        assert math.isnan(a)


# ---- layer_alphas ---------------------------------------------------------------------------------------------
KINDS = ["gauss", "gauss", "tiny", "orth", "rank1", "zero", "const", "nan"]
DEGENERATE = {"orth", "rank1", "zero", "const"}


def make_weight(kind, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "orth":
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float(), n, n
    w = torch.randn(n, k, generator=g)
    if kind == "tiny":
        w = w * 1e-30
    elif kind == "rank1":
        w = torch.randn(n, 1, generator=g) @ torch.randn(1, k, generator=g)
    elif kind == "zero":
        w = torch.zeros(n, k)
    elif kind == "const":
        w = torch.full((n, k), 0.7)
    elif kind == "nan":
        w[n // 2, k // 2] = NAN
    return w, n, k


block = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 10), st.integers(2, 10)), min_size=1, max_size=2)


@quiet
@given(blocks=st.lists(block, min_size=1, max_size=3), seed=st.integers(0, 2 ** 16),
       xmin=st.sampled_from(XMIN_MODES))
def test_layer_alphas(blocks, seed, xmin):
    model = nn.Module()
    model.layers = nn.ModuleList()
    kinds = {}
    for li, mats in enumerate(blocks):
        blk = nn.Module()
        for j, (kind, n, k) in enumerate(mats):
            w, n, k = make_weight(kind, n, k, seed + 31 * li + j)
            lin = nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            setattr(blk, f"p{j}", lin)
            kinds[f"layers.{li}.p{j}"] = kind
        model.layers.append(blk)
    nan_mods = [m for m, kd in kinds.items() if kd == "nan"]
    with must_return_within(20), recorded() as rec:
        if nan_mods:
            event("ValueError: NaN weight")
            with pytest.raises(ValueError, match=re.escape(nan_mods[0])):
                layer_alphas(model, xmin=xmin)
            return
        try:
            out, per, deg = layer_alphas(model, xmin=xmin, return_matrix_alphas=True, return_degenerate=True)
        except ValueError as e:
            event("ValueError: all degenerate")
            assert "every target matrix" in str(e)
            assert all(m in str(e) for m in kinds)                     # names every module
            return
    event("alphas, some degenerate" if deg else "alphas")
    assert len(out) == len(blocks) and all(math.isfinite(v) and v >= 0 for v in out), out
    assert {m for m, kd in kinds.items() if kd in DEGENERATE} <= set(deg)
    assert set(deg) == {m for m, v in per.items() if math.isnan(v)}
    msg = runtime_warnings(rec)
    assert all(m in msg for m in deg)                                  # every flagged module is named


# ---- allocate_experts on layer_alphas' output ------------------------------------------------------------------
# (covered by the two tests above: layer_alphas returns finite α ≥ 0, allocate_experts refuses α = 0 by name)


# ---- SensitivityTracker ---------------------------------------------------------------------------------------
inject = st.one_of(st.none(), st.tuples(st.sampled_from(["E", "A", "B"]), st.sampled_from(["weight", "grad"]),
                                        st.sampled_from(SPECIAL)))


@quiet
@given(r=st.integers(1, 3), k=st.integers(1, 4), n=st.integers(1, 4), with_e=st.booleans(),
       steps=st.lists(st.tuples(st.integers(0, 2 ** 16), st.sampled_from([1e-3, 1.0, 1e3]), inject), min_size=1,
                      max_size=4),
       b1=st.sampled_from([0.0, 0.5, 0.85]), b2=st.sampled_from([0.0, 0.85]))
def test_sensitivity_tracker(r, k, n, with_e, steps, b1, b2):
    shapes = {"E": (r,), "A": (r, k), "B": (n, r)}
    params = {nm: nn.Parameter(torch.zeros(sh)) for nm, sh in shapes.items() if nm != "E" or with_e}
    tr = SensitivityTracker({"m.q": (params.get("E"), params["A"], params["B"])}, beta1=b1, beta2=b2)
    ipt = {nm: torch.zeros(sh, dtype=torch.float64) for nm, sh in shapes.items()}
    unc = {nm: torch.zeros(sh, dtype=torch.float64) for nm, sh in shapes.items()}
    for seed, scale, inj in steps:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
                p.grad = torch.randn(p.shape, generator=g) * scale
        if inj is not None and inj[0] in params:
            t = params[inj[0]]
            with torch.no_grad():
                (t if inj[1] == "weight" else t.grad).view(-1)[0] = inj[2]
        else:
            inj = None
        before = [x.clone() for x in (tr._ipt_flat, tr._unc_flat, tr.scores)]
        with must_return_within(10), recorded() as rec:
            skipped = bool(tr.update())
        assert skipped == (inj is not None)
        event(f"skipped ({inj[1]})" if skipped else "updated")
        if skipped:                                                    # untouched, counted, warned about
            assert all(torch.equal(x, y) for x, y in zip(before, (tr._ipt_flat, tr._unc_flat, tr.scores)))
            msg = runtime_warnings(rec)
            assert "non-finite" in msg and (inj[1] == "grad" or "'m.q'" in msg)
            continue
        score = torch.zeros(r, dtype=torch.float64)
        for nm, p in params.items():
            i_now = (p.detach().double() * p.grad.double()).abs()
            ipt[nm] = b1 * ipt[nm] + (1 - b1) * i_now
            unc[nm] = b2 * unc[nm] + (1 - b2) * (i_now - ipt[nm]).abs()
            s = ipt[nm] * unc[nm]
            score += s if nm == "E" else (s.mean(1) if nm == "A" else s.mean(0))
        assert torch.isfinite(tr.scores).all() and torch.isfinite(tr._ipt_flat).all()
        torch.testing.assert_close(tr.scores.double(), score, rtol=1e-4, atol=1e-5 * float(score.abs().max()))
    assert tr.skipped_steps == sum(1 for _, _, inj in steps if inj is not None and inj[0] in params)


# ---- shapley_sensitivity --------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)
        lk.apply_adapters(self, ["fc"], r=2, alpha=2.0)
        with torch.no_grad():
            self.fc.lora_B.normal_()
        self.double()


def toy_loss(model, batch):
    x, y = batch
    return ((model.fc(x) - y) ** 2).mean(1)


TOY = Toy()
example = st.tuples(st.integers(0, 2 ** 16), st.sampled_from([None] * 4 + [NAN, INF, -INF, 1e200]))


@quiet
@given(batches=st.lists(st.lists(example, min_size=1, max_size=3), min_size=1, max_size=3),
       mode=st.sampled_from(["taylor", "taylor", "exact", "permutation"]), q=st.sampled_from([None, 1.0, 0.5]))
def test_shapley_sensitivity(batches, mode, q):
    data, clean, poisoned, seen = [], [], 0, 0
    for bt in batches:
        xs, ys, keep = [], [], []
        for seed, poison in bt:
            g = torch.Generator().manual_seed(seed)
            x, y = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
            if poison is not None:
                x[seed % 3] = poison
                poisoned += 1
            else:
                keep.append(len(xs))
            xs.append(x)
            ys.append(y)
            seen += 1
        data.append((torch.stack(xs), torch.stack(ys)))
        if keep:
            clean.append((data[-1][0][keep], data[-1][1][keep]))
    kw = dict(loss_fn=toy_loss, num_permutations=2)
    if mode == "taylor":
        kw["q"] = q
    with must_return_within(20), recorded() as rec:
        if poisoned == seen:
            event("ValueError: all non-finite")
            with pytest.raises(ValueError, match="non-finite"):
                shapley_sensitivity(TOY, data, mode, generator=torch.Generator().manual_seed(0), **kw)
            return
        got = shapley_sensitivity(TOY, data, mode, generator=torch.Generator().manual_seed(0), **kw)
    event(f"scores ({mode}), {'some' if poisoned else 'no'} examples skipped")
    assert torch.isfinite(got["fc"]).all()                             # players are never NaN
    msg = runtime_warnings(rec)
    assert (f"skipped {poisoned} of {seen}" in msg) if poisoned else "skipped" not in msg
    if poisoned and (mode == "exact" or q == 1.0):                     # deterministic: equals the clean subset
        ref = shapley_sensitivity(TOY, clean, mode, generator=torch.Generator().manual_seed(0), **kw)
        torch.testing.assert_close(got["fc"], ref["fc"], rtol=1e-9, atol=1e-12)
