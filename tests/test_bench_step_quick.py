"""The whole-step benchmark's quick variant end to end (real MiniLM-L6, tiny batch, 2 steps): every contestant
runs, and the result file carries the shared schema with the ratios and peak bytes the report reads."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from bench import bench_step  # noqa: E402
from bench.harness import SCHEMA  # noqa: E402


def test_step_quick_writes_every_contestant_in_the_schema(tmp_path):
    rows = bench_step.run(quick=True, directory=str(tmp_path), plots=str(tmp_path))
    doc = json.loads((tmp_path / "step_cpu_quick.json").read_text())
    assert doc["meta"]["threads"] == 2 and doc["meta"]["quick"] is True
    assert doc["rows"] == rows
    assert [r["provider"] for r in rows] == list(bench_step.CONTESTANTS)
    header = (tmp_path / "step_cpu_quick.csv").read_text().splitlines()[0].split(",")
    assert header[:len(SCHEMA)] == list(SCHEMA)
    by = {r["provider"]: r for r in rows}
    for r in rows:
        assert set(SCHEMA) <= set(r)
        assert r["op"] == "train_step" and r["unit"] == "ms" and r["dtype"] == "float32"
        assert r["shape"] == "minilm-b4-s32" and r["mode"] == "r8" and r["steps"] == 2
        assert 0 < r["p20"] <= r["median"] <= r["p80"]
        assert r["ratio_vs_peft"] == pytest.approx(r["median"] / by["peft"]["median"], rel=1e-3)
        assert r["ratio_vs_floor"] == pytest.approx(r["median"] / by["floor"]["median"], rel=1e-3)
        assert r["peak_bytes"] > 0
        assert r["peak_ratio_vs_peft"] == pytest.approx(r["peak_bytes"] / by["peft"]["peak_bytes"], rel=1e-3)
    assert by["peft"]["ratio_vs_peft"] == 1.0 and by["floor"]["ratio_vs_floor"] == 1.0
    assert (tmp_path / "step_cpu_quick.png").stat().st_size > 0


def test_contestants_train_what_they_claim():
    from python_api.layers import LoRALinear
    from python_api.moe import MoELoRALinear
    base, vocab, targets, task = bench_step.load("minilm")
    n_linear = 6 * len(targets)
    floor = bench_step.build("floor", base, targets, 8, 6)
    assert not any(p.requires_grad for p in floor.parameters())
    ours = bench_step.build("ours_half_masked", base, targets, 8, 6)
    lora = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == n_linear and all(m.active_rank == 4 for m in lora)
    moe = [m for m in bench_step.build("moe", base, targets, 8, 6).modules() if isinstance(m, MoELoRALinear)]
    assert len(moe) == n_linear and all(m.num_experts == bench_step.MOE_EXPERTS and m.r == 4 for m in moe)
    peft = bench_step.build("peft", base, targets, 8, 6)
    assert sum("lora_A" in n for n, p in peft.named_parameters() if p.requires_grad) == n_linear
    # the frozen base is shared, not copied
    assert floor.bert.embeddings.word_embeddings.weight is base.bert.embeddings.word_embeddings.weight
