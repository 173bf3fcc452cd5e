"""Builds bench/RESULTS.md (+ PNG plots in bench/plots/) from the committed result files.

    python -m bench.report

Every number in the report comes from a file in bench/results/ written by a benchmark run; the report
never measures anything itself. CPU rows are ratios measured side by side in one process. Pictures:
a ratio bar chart per file, scaling curves where a file's shapes vary one size (tokens, rank, active
ranks, experts, layers), accuracy bars with seed spread, and the allocations the accuracy run recorded
(rank heatmaps, Shapley sensitivity with its spread, experts and alphas per layer).
"""
from __future__ import annotations

import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PLOTS = os.path.join(HERE, "plots")

SECTIONS = [  # (title, file prefix, what the reader should look at)
    ("Gated LoRA linear (CPU)", "gated_cpu", "forward+backward (full) and inference forward (fwd) vs PEFT LoRA and "
     "the frozen nn.Linear floor; cost vs tokens and vs rank; masked rank vs dense rank-k; per-token gate vs the "
     "same math as autograd ops"),
    ("Gated LoRA linear (GPU)", "gated_gpu", "T=8192, d=4096, r=16 bf16: overhead over nn.Linear (target ≤ 8%)"),
    ("GPU kernels: sensitivity update, ShareLoRA accumulation, MoE-LoRA, layer alphas", "kernels_gpu",
     "vs a PEFT-style per-parameter loop / autograd accumulation / a loop over experts / per-matrix svdvals + "
     "Hill; GB/s and % of the card's peak (H100: 3.35 TB/s, 990 TFLOP/s bf16)"),
    ("Whole fine-tuning step (CPU)", "step", "one training step (forward, loss, backward, AdamW) per contestant, "
     "interleaved in one process, 2 threads: the frozen base (floor), PEFT LoRA, ours, ours with half the ranks "
     "masked, ShareA, MoE-LoRA (and `ours_reference`: ours on the pure-torch reference backend); ratio_vs_peft, "
     "ratio_vs_floor and peak allocator bytes; `python -m bench.bench_step`"),
    ("Allocation overhead: sensitivity tracker vs PEFT RankAllocator", "alloc", ""),
    ("Training memory per method (MiniLM-L6)", "memory", "trainable parameters, AdamW state, gradient bytes and "
     "peak allocator bytes of one steady-state training step (torch profiler, CPU allocator), same model and "
     "batch for every method; `python -m bench.bench_memory`"),
    ("ShareLoRA: parameters, optimizer state, memory, accumulation", "share", ""),
    ("AlphaLoRA: layer alphas vs weightwatcher", "alpha", ""),
    ("MoE-LoRA layer", "moe", ""),
    ("Accuracy at equal trainable parameters", "accuracy", "test accuracy, mean ± sample std over seeds, "
     "MiniLM-L6 on Rotten Tomatoes (both offline); `python -m bench.bench_accuracy` (`--groups peer`: PEFT's own "
     "LoRA and AdaLoRA in the same loop)"),
    ("Evaluation protocol: allocators vs uniform LoRA (issue #16)", "protocol", "test accuracy per task, mean ± sd "
     "over seeds; Δ: paired difference against uniform LoRA with its 95% t-interval; lr per method chosen on "
     "validation; `python -m bench.bench_protocol`"),
]
# columns too bulky for a table: drawn as pictures instead
_BULKY = {"ranks", "shapley", "ranks_per_seed", "alphas", "experts", "accs"}
_SIZE = re.compile(r"(?:^|[-_/ ])(T|d|r|R|E|L|k|active|layers)(\d+)(?=$|[-_/ ,])")


def _load(prefix: str, directory: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(directory, f"{prefix}*.json"))):
        if path.endswith("_quick.json"):
            continue
        with open(path) as f:
            out.append((os.path.basename(path), json.load(f)))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _table(rows: list[dict]) -> str:
    skip = {"version", "commit", "date"} | _BULKY
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in skip and k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, plots: str, name: str) -> str:
    os.makedirs(plots, exist_ok=True)
    path = os.path.join(plots, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ratios(name: str, rows: list[dict], plots: str) -> str | None:
    keys = [k for k in ("ratio_vs_peft", "ratio_vs_dense_rank_k", "ratio_vs_python_loop", "ratio_vs_autograd",
                        "ratio", "speedup", "speedup_vs_weightwatcher", "overhead_vs_linear")
            if any(k in r for r in rows)]
    if not keys:
        return None
    plt = _plt()
    key = keys[0]
    pts = [(f"{r.get('provider', '')}\n{r.get('shape', '')}"[:60], r[key]) for r in rows
           if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(pts)), 3.4))
    ax.bar(range(len(pts)), [p[1] for p in pts], color="#4c72b0")
    ax.set_xticks(range(len(pts)), [p[0] for p in pts], fontsize=6, rotation=30, ha="right")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel(key)
    ax.set_title(name, fontsize=9)
    return _save(fig, plt, plots, name.replace(".json", ".png"))


def _sizes(shape) -> dict[str, int]:
    return {k: int(v) for k, v in _SIZE.findall(str(shape))}


def scaling_series(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, list[tuple[int, float]]]]:
    """(op, mode, varying size) → provider → [(size, median)] for timed rows whose shapes differ in exactly
    one parsed size (T tokens, r rank, active ranks, E experts, L layers, ...); ≥ 2 points per curve."""
    timed = [r for r in rows if r.get("unit") in ("ms", "s", "us") and isinstance(r.get("median"), (int, float))]
    out: dict = {}
    by_op: dict[tuple[str, str], list[dict]] = {}
    for r in timed:
        by_op.setdefault((r.get("op", ""), r.get("mode", "")), []).append(r)
    for (op, mode), rs in by_op.items():
        sizes = [_sizes(r.get("shape")) for r in rs]
        keys = set().union(*sizes) if sizes else set()
        for k in sorted(keys):
            others = {kk for kk in keys if kk != k}
            curves: dict[str, dict[tuple, list]] = {}
            for r, s in zip(rs, sizes):
                if k not in s:
                    continue
                fixed = tuple(sorted((kk, s.get(kk)) for kk in others))
                curves.setdefault(r.get("provider", ""), {}).setdefault(fixed, []).append((s[k], r["median"]))
            series = {}
            for prov, groups in curves.items():
                best = max(groups.values(), key=len)
                pts = sorted(set(best))
                if len({p[0] for p in pts}) >= 2:
                    series[prov] = pts
            if series:
                out[(op, mode, k)] = series
    return out


def _plot_scaling(name: str, rows: list[dict], plots: str) -> list[str]:
    paths = []
    for (op, mode, k), series in scaling_series(rows).items():
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        for prov, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prov)
        unit = next((r.get("unit") for r in rows if r.get("op") == op), "")
        ax.set_xlabel({"T": "tokens", "r": "rank", "R": "max rank", "active": "active ranks", "E": "experts",
                       "L": "layers", "layers": "layers", "d": "hidden size", "k": "top-k"}.get(k, k))
        ax.set_ylabel(f"median ({unit})")
        ax.set_title(f"{op} ({mode}): cost vs {k}", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(_save(fig, plt, plots, f"{name.replace('.json', '')}_scaling_{op}_{mode}_{k}.png"))
    return paths


# ---- accuracy ------------------------------------------------------------------------------------------
def _accuracy_md(name: str, rows: list[dict], plots: str) -> tuple[list[str], list[str]]:
    """Summary lines per group and pictures for an accuracy result file."""
    lines, imgs = [], []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group", "?"), []).append(r)
    lora = next((r for r in rows if r["provider"] == "lora"), None)
    for g, rs in groups.items():
        base = next((r for r in rs if r["provider"] in ("lora", "moe_uniform")), None)
        if base is None and g in ("share", "peer") and lora is not None:
            base = lora                    # one LoRA run serves these groups: same config, seeds and data order
            rs = [lora, *rs]
        lines += [f"**{g}**", "", "| method | acc mean ± std | seeds | per-seed | trainable params | "
                  "Δ vs baseline | train s | alloc s |", "|---|---|---|---|---|---|---|---|"]
        for r in rs:
            std = r.get("acc_std")
            d = "" if base is None or r is base else f"{r['acc_mean'] - base['acc_mean']:+.4f}"
            lines.append(f"| {r['provider']} | {r['acc_mean']:.4f} ± {'n/a' if std is None else f'{std:.4f}'} | "
                         f"{r.get('n_seeds', len(r.get('seeds', [])))} | {_fmt(r.get('accs', []))} | "
                         f"{r.get('trainable_params')} | {d} | {r.get('train_time_s')} | {r.get('alloc_time_s')} |")
        lines.append("")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 1), 3.4))
    xs = range(len(rows))
    ax.bar(xs, [r["acc_mean"] for r in rows], yerr=[r.get("acc_std") or 0 for r in rows], capsize=3,
           color=[{"rank": "#4c72b0", "share": "#55a868", "moe": "#c44e52"}.get(r.get("group"), "#8c8c8c")
                  for r in rows])
    for i, r in enumerate(rows):
        ax.plot([i] * len(r.get("accs", [])), r.get("accs", []), "k.", ms=4)
    ax.set_xticks(list(xs), [f"{r['provider']}\n({r.get('group')})" for r in rows], fontsize=7)
    lo = min(min(r.get("accs") or [r["acc_mean"]]) for r in rows)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(r["acc_mean"] + (r.get("acc_std") or 0) for r in rows) + 0.03))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{name}: mean ± std (dots: seeds)", fontsize=9)
    imgs.append(_save(fig, plt, plots, name.replace(".json", "_bars.png")))
    imgs += _allocation_plots(name, rows, plots)
    return lines, imgs


def _allocation_plots(name: str, rows: list[dict], plots: str) -> list[str]:
    from python_api.app.plots import rank_heatmap
    stem = name.replace(".json", "")
    imgs = []
    for r in rows:
        if r.get("ranks"):
            r_max = max(r["ranks"].values()) or 1
            imgs.append(rank_heatmap(r["ranks"], os.path.join(plots, f"{stem}_ranks_{r['provider']}.png"),
                                     title=f"{r['provider']}: kept rank per module (seed {r['seeds'][-1]})",
                                     r_max=r_max))
    shap = next((r for r in rows if r.get("shapley")), None)
    if shap:
        plt = _plt()
        names = list(shap["shapley"])
        vals = [[v for v in shap["shapley"][n] if v is not None] for n in names]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 3.6))
        ax.boxplot(vals, showfliers=True)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xticks(range(1, len(names) + 1), [n.replace("bert.encoder.layer.", "L").replace(".attention", "")
                                                 for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("Shapley φ per rank (−Δ val loss)")
        ax.set_title("ShapLoRA: Shapley sensitivity of each module's ranks (spread over ranks)", fontsize=9)
        imgs.append(_save(fig, plt, plots, f"{stem}_shapley.png"))
    moe = [r for r in rows if r.get("experts")]
    if moe:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        L = len(moe[0]["experts"])
        w = 0.8 / len(moe)
        for i, r in enumerate(moe):
            ax.bar([x + i * w for x in range(L)], r["experts"], width=w, label=r["provider"])
        ax.set_xlabel("layer")
        ax.set_ylabel("experts")
        alphas = next((r["alphas"] for r in moe if r.get("alphas")), None)
        if alphas:
            ax2 = ax.twinx()
            ax2.plot([x + 0.4 - w / 2 for x in range(L)], alphas, "o-", color="k", label="layer alpha (Hill)")
            ax2.set_ylabel("layer alpha")
            ax2.legend(fontsize=7, loc="upper right")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("experts per layer (same total) and AlphaLoRA's layer alphas", fontsize=9)
        imgs.append(_save(fig, plt, plots, f"{stem}_experts.png"))
    return imgs


# ---- memory --------------------------------------------------------------------------------------------
MEMORY_OPS = ("trainable_params", "optimizer_state", "grad_bytes", "peak_step_bytes", "peak_train_bytes")


def _mib(v) -> str:
    return f"{v / 2**20:.2f}" if isinstance(v, (int, float)) else ""


def _memory_md(name: str, rows: list[dict], plots: str) -> tuple[list[str], list[str]]:
    """One line per method (trainable params, then MiB) and a bar chart of peak training memory."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("op") in MEMORY_OPS:
            by.setdefault(r["provider"], {})[r["op"]] = r["median"]
    if not by:
        return [], []
    lines = ["| method | trainable params | optimizer state MiB | grads MiB | peak step MiB | peak train MiB |",
             "|---|---|---|---|---|---|"]
    for prov, m in by.items():
        lines.append(f"| {prov} | {m.get('trainable_params', '')} | {_mib(m.get('optimizer_state'))} | "
                     f"{_mib(m.get('grad_bytes'))} | {_mib(m.get('peak_step_bytes'))} | "
                     f"{_mib(m.get('peak_train_bytes'))} |")
    lines.append("")
    key = "peak_train_bytes" if any("peak_train_bytes" in m for m in by.values()) else "peak_step_bytes"
    pts = [(p, m[key] / 2**20) for p, m in by.items() if key in m]
    if not pts:
        return lines, []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(pts) + 1), 3.4))
    ax.bar(range(len(pts)), [v for _, v in pts], color="#8172b2")
    ax.set_xticks(range(len(pts)), [p for p, _ in pts], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"{key} (MiB)")
    ax.set_title(f"{name}: {key} per method", fontsize=9)
    return lines, [_save(fig, plt, plots, name.replace(".json", "_peak.png"))]


def _rows_of(prefix: str, results: str) -> list[dict]:
    out = []
    for _, data in _load(prefix, results):
        out += data.get("rows", []) if isinstance(data, dict) else data
    return out


def _span(vals: list[float]) -> str:
    return f"{min(vals):.2f}" if len(vals) == 1 or min(vals) == max(vals) else f"{min(vals):.2f}–{max(vals):.2f}"


def goals_md(results: str = RESULTS) -> list[str]:
    """The CPU goals of docs/PERFORMANCE.md §5, each with what the result files measured (or "not measured")."""
    step = [r for r in _rows_of("step_cpu", results) if r.get("op") == "train_step" and r.get("provider") == "ours"]
    gated = [r for r in _rows_of("gated_cpu", results) if r.get("op") == "lora_linear" and r.get("mode") == "full"
             and r.get("provider") == "lora_kernels" and r.get("ratio_vs_peft") is not None
             and _sizes(r.get("shape", "")).get("T", 0) >= 512]
    alloc = _rows_of("alloc_cpu", results)
    alpha = _rows_of("alpha_cpu", results)

    def pick(rows, op, key="median"):
        return [r[key] for r in rows if r.get("op") == op and isinstance(r.get(key), (int, float))]

    rows = [
        ("whole step, ours / PEFT", "<= 0.85", [r["ratio_vs_peft"] for r in step], lambda v: max(v) <= 0.85),
        ("whole step, ours / floor", "<= 1.10", [r["ratio_vs_floor"] for r in step], lambda v: max(v) <= 1.10),
        ("peak training memory, ours / PEFT", "<= 0.90", [r["peak_ratio_vs_peft"] for r in step
                                                          if r.get("peak_ratio_vs_peft") is not None],
         lambda v: max(v) <= 0.90),
        ("LoRALinear fwd+bwd / PEFT, T >= 512", "<= 0.80", [r["ratio_vs_peft"] for r in gated],
         lambda v: max(v) <= 0.80),
        ("AdaLoRA update, PEFT / ours (MiniLM-L6)", ">= 10",
         pick(alloc, "update_and_allocate speedup (peft/lora_kernels)")[:1], lambda v: min(v) >= 10),
        ("layer_alphas, weightwatcher / ours", ">= 5",
         [r["speedup_vs_weightwatcher"] for r in alpha if str(r.get("provider", "")).startswith("ours-scan")],
         lambda v: min(v) >= 5),
        ("one Shapley pass / validation epoch", "<= 1.0", pick(alloc, "shapley_taylor_pass/validation_epoch"),
         lambda v: max(v) <= 1.0),
    ]
    # context a bare ratio would hide, keyed by goal
    notes = {}
    floor = pick(alloc, "shapley_taylor_pass/gradient_epoch")
    if floor:
        notes["one Shapley pass / validation epoch"] = (
            f" ({_span(floor)}× one forward + backward-to-inputs epoch: the floor of any gradient-based score; a "
            "forward-only epoch cannot be matched by a pass that needs a backward)")
    lines = ["| goal (docs/PERFORMANCE.md §5) | target | measured | verdict |", "| --- | --- | --- | --- |"]
    for name, target, vals, ok in rows:
        lines.append(f"| {name} | {target} | {_span(vals) if vals else 'not measured'}{notes.get(name, '')} | "
                     f"{('met' if ok(vals) else 'missed') if vals else '-'} |")
    return lines


def build(results: str = RESULTS, out_dir: str = HERE, plots: str | None = None) -> str:
    """Writes ``<out_dir>/RESULTS.md`` and PNGs under ``plots`` (default ``<out_dir>/plots``); returns the text."""
    plots = plots or os.path.join(out_dir, "plots")
    rel = (lambda p: os.path.relpath(p, out_dir))
    parts = ["# Results", "",
             "Generated by `python -m bench.report` (or `python -m bench.run_all`) from the files in "
             "`bench/results/` (do not edit by hand). CPU figures are ratios measured side by side in one process "
             "(threads pinned, median of repeats); GPU figures name their card. A section without a file says "
             "so: nothing here is estimated.", "",
             "## Goals", "", "_Every CPU goal with the figure the result files hold (the worst case where a goal "
             "spans several shapes); a missed goal is reported as missed._", "", *goals_md(results), ""]
    for title, prefix, note in SECTIONS:
        parts += [f"## {title}", ""]
        if note:
            parts += [f"_{note}_", ""]
        files = _load(prefix, results)
        if not files:
            parts += ["No result file yet.", ""]
            continue
        for fname, data in files:
            rows = data.get("rows", []) if isinstance(data, dict) else data
            meta = data.get("meta", {}) if isinstance(data, dict) else {}
            parts += [f"`{fname}` — " + ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
            if not rows:
                parts += ["(no rows)", ""]
                continue
            imgs = []
            if prefix == "protocol":   # its own tables and charts; the raw rows are too wide to read
                from bench.bench_protocol import report_md
                lines, imgs = report_md(fname, rows, plots)
                parts += lines + [f"![{os.path.basename(i)}]({rel(i)})" for i in imgs] + [""]
                continue
            if prefix in ("accuracy", "memory"):
                lines, imgs = (_accuracy_md if prefix == "accuracy" else _memory_md)(fname, rows, plots)
                parts += lines
            parts += [_table(rows), ""]
            img = _plot_ratios(fname, rows, plots)
            imgs = ([img] if img else []) + imgs + _plot_scaling(fname, rows, plots)
            parts += [f"![{os.path.basename(i)}]({rel(i)})" for i in imgs]
            parts += [""]
        if prefix == "step" and len(files) > 1:   # every model, rank and dtype in one picture
            from bench.bench_step import plot as plot_steps
            every = [r for _, d in files for r in (d.get("rows", []) if isinstance(d, dict) else d)
                     if r.get("op") == "train_step"]
            img = plot_steps(every, os.path.join(plots, "step_cpu_all.png"))
            parts += ["All whole-step configurations:", "", f"![{os.path.basename(img)}]({rel(img)})", ""]
    shown = {os.path.basename(line.split("(", 1)[1].rstrip(")")) for line in parts if line.startswith("![")}
    extra = [p for p in sorted(glob.glob(os.path.join(plots, "alloc_*.png"))) if os.path.basename(p) not in shown]
    if extra:
        parts += ["## Other allocation pictures", ""] + [f"![{os.path.basename(i)}]({rel(i)})" for i in extra] + [""]
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    build()
    print(os.path.join(HERE, "RESULTS.md"))
