"""Generated save/load round trips (hypothesis; example counts from the profile in tests/conftest.py): any
adaptation, values, rank masks, step and JSON ``extra`` reload bit-exact, also over a previous checkpoint;
anything ``extra`` cannot store is refused naming its key before a byte is written; a tensor or config file
cut at any length is refused naming the file."""
from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import given
from hypothesis import strategies as st

import python_api as lk
from python_api.checkpoint import CONFIG_FILE, TENSOR_FILE, CheckpointError, checkpoint_info
from tests.python_api.toy_models import toy

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(11))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def adaptations(draw) -> dict:
    share = draw(st.sampled_from([None, "A", "B", "AB"]))
    kw = dict(target_modules=draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True)),
              r=draw(st.integers(1, 6)), alpha=draw(st.floats(0.5, 32)), share=share, svd=draw(st.booleans()))
    if share:
        kw["share_scope"] = draw(st.sampled_from(["module_type", "attention"]))
    elif draw(st.booleans()):
        name = f"layers.{draw(st.integers(0, 2))}.{kw['target_modules'][0]}"
        kw["rank_pattern"] = {name: draw(st.integers(1, 6))}
    if draw(st.booleans()):
        kw["modules_to_save"] = ["classifier"]
    return kw


def build(kw: dict, seed: int, masks: list[bool] | None) -> torch.nn.Module:
    m = lk.apply_adapters(toy(0), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    if kw["svd"] and masks is not None:
        for layer in lk.adapter_layers(m).values():
            layer.set_rank_mask([masks[i % len(masks)] for i in range(layer.r)])
    return m


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    with torch.no_grad():
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a(X), b(X))


@given(kw=adaptations(), seeds=st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)),
       masks=st.none() | st.lists(st.booleans(), min_size=1, max_size=6),
       step=st.none() | st.integers(-2**63, 2**63 - 1), extra=st.dictionaries(st.text(max_size=8), json_values))
def test_round_trip_is_bit_exact_also_over_a_previous_checkpoint(kw, seeds, masks, step, extra):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        for seed in seeds:                          # the second save replaces the first
            m = build(kw, seed, masks)
            lk.save_adapters(m, path, step=step, extra=extra)
            assert same(lk.load_adapters(toy(0), path), m)
            info = checkpoint_info(path)
            assert info["extra"] == extra and info["step"] == step
        assert os.listdir(d) == ["ckpt"]


@given(keys=st.lists(st.text(max_size=6), min_size=1, max_size=4), bad=st.sampled_from(
    [object(), {1, 2}, b"bytes", torch.zeros(1), complex(1, 2)]), around=json_values)
def test_unstorable_extra_is_refused_naming_its_key_before_any_write(keys, bad, around):
    def nest(ks):
        return bad if not ks else {ks[0]: nest(ks[1:])}

    extra = {"ok": around, **nest(keys)}
    where = "extra" + "".join(f"[{k!r}]" for k in keys)
    m = build(dict(target_modules=["q_proj"], r=2, alpha=2.0, svd=False), 0, None)
    with tempfile.TemporaryDirectory() as d:
        try:
            lk.save_adapters(m, os.path.join(d, "ckpt"), extra=extra)
        except TypeError as e:
            assert str(e).startswith(f"{where} is a "), (str(e), where)
        else:
            raise AssertionError(f"{where} = {bad!r} was accepted")
        assert os.listdir(d) == []


@given(which=st.sampled_from([CONFIG_FILE, TENSOR_FILE]), cut=st.floats(0, 1, exclude_max=True))
def test_a_file_cut_at_any_length_is_refused_naming_it(which, cut):
    m = build(dict(target_modules=["q_proj", "v_proj"], r=2, alpha=2.0, svd=True), 0, None)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        lk.save_adapters(m, path)
        p = os.path.join(path, which)
        data = open(p, "rb").read()
        with open(p, "wb") as f:
            f.write(data[: int(len(data) * cut)])
        try:
            lk.load_adapters(toy(0), path)
        except CheckpointError as e:
            assert p in str(e), str(e)
        else:
            raise AssertionError(f"{which} cut to {int(len(data) * cut)} of {len(data)} bytes was loaded")
