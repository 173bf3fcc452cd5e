"""Planted structure (issue 16): at a budget equal to the planted total rank, ShapLoRA's default workflow must
put exactly the planted number of ranks in each module, and its retrained plain LoRA must beat uniform LoRA at
an equal-or-larger budget. Small versions of bench/bench_planted.py (several sizes, seeds and rank mixes)."""
import math
import warnings

import pytest

from bench import bench_planted as bp

HP = {**bp.HP, "r_init": 4, "sup_steps": 150, "steps": 150, "n_val": 512, "n_test": 1024}
CASES = {  # width, modules, planted {module: rank}, seed
    "d16_L6_r21": ({"d": 16, "layers": 6, "planted": {1: 2, 4: 1}}, 0),
    "d24_L4_r13": ({"d": 24, "layers": 4, "planted": {0: 1, 2: 3}}, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shaplora_default_finds_planted_pattern(case):
    cfg, seed = CASES[case]
    task = bp.make_task(cfg, seed, HP)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no extension, no instability warning on this task
        res = bp.run_shaplora(task, bp.DEFAULT_VARIANT, seed, HP)
    assert res["counts"] == cfg["planted"], res["counts"]
    assert res["supernet_rel_loss"] < 0.05 and res["stability"] >= 0.5
    budget = sum(cfg["planted"].values())
    uniform = bp.retrain_plain(task, math.ceil(budget / cfg["layers"]), seed, HP)
    print(f"\n{case}: ShapLoRA plain retrain rel. loss {res['loss']:.2e}, SVD form {res['svd_loss']:.2e}, "
          f"uniform {uniform:.2e}, stability {res['stability']:.2f}")
    assert res["loss"] < 0.5 * uniform and res["svd_loss"] < 0.5 * uniform


def test_pattern_scoring():
    planted = {1: 2, 4: 1}
    assert bp.score({1: 2, 4: 1}, planted) == {"exact": True, "support": True, "misplaced": 0}
    assert bp.score({1: 3}, planted) == {"exact": False, "support": True, "misplaced": 0}
    assert bp.score({1: 2, 3: 1}, planted) == {"exact": False, "support": False, "misplaced": 1}
