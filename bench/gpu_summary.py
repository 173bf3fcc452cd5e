"""One table of the GPU suite's results against the targets of docs/PERFORMANCE.md §4, and the suite's verdict.

    python -m bench.gpu_summary DIR        (DIR holds gated_gpu_<card>.json / kernels_gpu_<card>.json / step_*.json)

Exit status: 0 when no correctness check failed, 1 otherwise. A correctness failure is a row with an ``error``
(a provider that raised) other than a budget skip, or a kernel whose relative error against its peer exceeds the
tolerance. Performance targets missed are reported as "missed" and do not fail the suite: a target is a goal,
a wrong result is a bug.
"""
from __future__ import annotations

import glob
import json
import os
import sys

# relative error a fused kernel may show against its fp32 peer (sensitivity scores, shared-gradient sums)
REL_ERR_TOL = 1e-3


def _rows(directory: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*_gpu_*.json")) + glob.glob(os.path.join(directory,
                                                                                                  "step_*.json"))):
        with open(path) as f:
            rows += json.load(f).get("rows", [])
    return rows


def _find(rows, op, provider=None, **match):
    for r in rows:
        if r.get("op") == op and (provider is None or r.get("provider") == provider) and "error" not in r and \
                all(str(r.get(k)) == str(v) for k, v in match.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, verdict) for each docs/PERFORMANCE.md §4 target; "no result" where nothing ran."""
    out = []

    def add(name, goal, value, ok):
        if value is None:
            out.append((name, goal, "no result", "-"))
        else:
            out.append((name, goal, value, "met" if ok else "missed"))

    r = _find(rows, "lora_linear", "lora_kernels")
    ov = r.get("overhead_vs_linear") if r else None
    add("fused overhead over frozen nn.Linear (T=8192, d=4096, r=16, bf16)", "<= 5%",
        None if ov is None else f"{100 * ov:.1f}%", ov is not None and ov <= 0.05)
    ratios = [r["ratio_vs_dense_rank_k"] for r in rows if r.get("op") == "lora_linear_masked"
              and r.get("ratio_vs_dense_rank_k") is not None]
    add("masked rank vs dense rank-k", "<= 1.15x", f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else None,
        bool(ratios) and max(ratios) <= 1.15)
    dec = [r for r in rows if r.get("op") == "lora_linear_decode" and "median" in r]
    if dec:
        best = {}
        for r in dec:
            if r["shape"] not in best or r["median"] < best[r["shape"]]["median"]:
                best[r["shape"]] = r
        pct = [b.get("pct_of_peak") or 0 for b in best.values()]
        add("decode path T<=64 (best backend, % of HBM peak)", "reported", f"{min(pct):.0f}-{max(pct):.0f}%", True)
    else:
        add("decode path T<=64 (best backend, % of HBM peak)", "reported", None, False)
    sens = [r for r in rows if r.get("op") == "sensitivity_update" and str(r.get("provider", "")).startswith("kernel[")
            and "median" in r]
    best = min(sens, key=lambda r: r["median"]) if sens else None
    add("sensitivity update, 7B-like adapters (40M params)", "<= 0.5 ms",
        None if best is None else f"{best['median']:.3f} ms ({best['provider']})",
        best is not None and best["median"] <= 0.5)
    step = [r for r in rows if r.get("op") == "train_step" and r.get("device", "").startswith(("cuda", "NVIDIA"))
            and r.get("ratio_vs_peft") is not None and r.get("provider") == "ours"]
    add("whole step vs PEFT, SmolLM2-135M", "< 1.0x",
        ", ".join(f"{r['dtype']} r={r.get('r')}: {r['ratio_vs_peft']:.2f}x" for r in step) if step else None,
        bool(step) and all(r["ratio_vs_peft"] < 1.0 for r in step))
    return out


def correctness_failures(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        err = r.get("error")
        if err and not str(err).startswith("skipped"):
            bad.append(f"{r.get('op')}/{r.get('provider')}: {err}")
        for key in ("rel_err_vs_peer", "rel_err_vs_autograd"):
            v = r.get(key)
            if isinstance(v, (int, float)) and v > REL_ERR_TOL:
                bad.append(f"{r.get('op')}/{r.get('provider')}: {key} = {v:.2e} > {REL_ERR_TOL:g}")
    return bad


def render(rows: list[dict]) -> str:
    lines = ["| target (docs/PERFORMANCE.md §4) | goal | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    directory = argv[0] if argv else "out/gpu"
    rows = _rows(directory)
    print(render(rows))
    bad = correctness_failures(rows)
    for b in bad:
        print("CORRECTNESS FAILURE:", b)
    print(f"{len(rows)} result rows, {len(bad)} correctness failures")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
