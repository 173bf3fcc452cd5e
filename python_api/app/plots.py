"""Allocation plots as PNG files (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

_INDEX = re.compile(r"\.(\d+)\.")


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _layer_and_type(name: str) -> tuple[int, str]:
    m = _INDEX.search(name)
    if m is None:
        return 0, name
    return int(m.group(1)), name[m.end():]


def rank_heatmap(ranks: dict[str, int], path: str, title: str = "allocated rank per module",
                 r_max: int | None = None) -> str:
    """Heatmap of ranks (layers × module types) from ``{module name: rank}``; writes a PNG and returns its path."""
    plt = _plt()
    cells = {}
    for name, r in ranks.items():
        cells[_layer_and_type(name)] = int(r)
    layers = sorted({li for li, _ in cells})
    types = list(dict.fromkeys(t for _, t in sorted(cells, key=lambda k: k[0])))
    grid = [[cells.get((li, t), 0) for li in layers] for t in types]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(layers), 1.0 + 0.45 * len(types)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r_max or max(1, max(ranks.values(), default=1)), aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="w" if v < (r_max or 8) / 2 else "k", fontsize=8)
    ax.set_xticks(range(len(layers)), [str(li) for li in layers])
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    return _save(fig, plt, path)


def expert_bars(experts: Sequence[int], alphas: Sequence[float] | None, path: str,
                title: str = "AlphaLoRA experts per layer") -> str:
    """Bar chart of experts per layer, with the layer alphas on a second axis when given."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(experts) + 2), 3.2))
    xs = list(range(len(experts)))
    ax.bar(xs, list(experts), color="tab:blue", label="experts")
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    if alphas is not None:
        ax2 = ax.twinx()
        ax2.plot(xs, list(alphas), "o-", color="tab:red", label="alpha (Hill)")
        ax2.set_ylabel("layer alpha", color="tab:red")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def comparison_bars(rows: list[dict], path: str, metric: str = "accuracy", title: str = "test accuracy") -> str:
    """One bar per method (rows carry ``method`` and ``metric``; rows without the metric are skipped)."""
    plt = _plt()
    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1), 3.2))
    ax.bar([r["method"] for r in rows], [r[metric] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        ax.text(i, r[metric], f"{r[metric]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
