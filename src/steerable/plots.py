"""Every figure of the package (PNG via matplotlib's Agg backend; no display needed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from steerable.utils.files import atomic_path

COLORS = {
    "btl": "tab:gray",
    "dpl": "tab:orange",
    "np-btl": "tab:blue",
    "vnp-btl": "tab:purple",
    "bayes": "black",
}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write the figure atomically (in the main process only, when several run a study)."""
    from steerable.utils.distributed import is_main_process

    path = Path(path)
    if is_main_process():
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_accuracy_vs_context(
    path: str | Path,
    curves: Mapping[str, Mapping[int, float]],
    stderr: Mapping[str, Mapping[int, float]] | None = None,
    bayes: Mapping[int, float] | None = None,
    title: str = "Accuracy on unseen pairs vs number of context pairs",
) -> Path:
    """Accuracy vs N^C per model (± 1 standard error), with the Bayes-optimal curve when known."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if bayes is not None:
        ks = sorted(bayes)
        ax.plot(ks, [bayes[k] for k in ks], "k--", lw=1.5, label="Bayes-optimal", zorder=5)
    for name, curve in curves.items():
        ks = sorted(curve)
        ys = np.array([curve[k] for k in ks])
        err = np.array([stderr[name][k] for k in ks]) if stderr and name in stderr else None
        ax.errorbar(ks, ys, yerr=err, marker="o", ms=4, capsize=2, label=name, color=COLORS.get(name))
    ax.set_xlabel("context pairs $N^C$")
    ax.set_ylabel("accuracy on $D^T \\setminus D^C$")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_reward_functions_1d(
    path: str | Path,
    grid: np.ndarray,
    truth: Mapping[str, np.ndarray],
    panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray | None]]],
) -> Path:
    """Figure 1a: fitted reward functions on a 1-D option grid against the true reward of each mode.

    ``panels[model][label] = (reward, std or None)``. Rewards are only defined up to a monotone
    transformation, so every curve is standardised (zero mean, unit variance over the grid).
    """

    def standardise(r: np.ndarray, s: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        mu, sd = r.mean(), r.std() + 1e-12
        return (r - mu) / sd, None if s is None else s / sd

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    styles = ["tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        for (label, r), color in zip(truth.items(), styles, strict=False):
            ax.plot(grid, standardise(r)[0], color=color, lw=4, alpha=0.25, label=f"true: {label}")
        for (label, (r, s)), color in zip(
            curves.items(), ["tab:blue", "tab:orange", "tab:purple", "tab:gray"], strict=False
        ):
            rs, ss = standardise(r, s)
            ax.plot(grid, rs, color=color, lw=1.8, label=label)
            if ss is not None:
                ax.fill_between(grid, rs - ss, rs + ss, color=color, alpha=0.15)
        ax.set_title(name)
        ax.set_ylim(-4, 4)
        ax.set_xlabel("option y")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("reward (standardised)")
    return _save(fig, path)


def plot_error_vs_rho(
    path: str | Path,
    curves: Mapping[str, Mapping[float, float]],
    stderr: Mapping[str, Mapping[float, float]] | None,
    bayes: Callable[[float], float],
) -> Path:
    """Figure 4: single-context identification error vs test correlation ρ, per training ρ."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = np.linspace(-1, 0.999, 200)
    ax.plot(dense, [bayes(r) for r in dense], "k--", lw=1.5, label="Bayes-optimal ¼ + arcsin(ρ)/2π")
    cmap = plt.get_cmap("viridis")
    for i, (name, curve) in enumerate(curves.items()):
        rs = sorted(curve)
        err = [stderr[name][r] for r in rs] if stderr else None
        ax.errorbar(
            rs,
            [curve[r] for r in rs],
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            label=name,
            color=cmap(i / max(1, len(curves) - 1)),
        )
    ax.set_xlabel("test correlation ρ")
    ax.set_ylabel("error on conflicting targets ($N^C$ = 1)")
    ax.set_title("Identifiability of the hidden context (Example 4.3)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_per_mode(
    path: str | Path,
    modes: list[str],
    models: Mapping[str, Mapping[str, Mapping[str, float]]],
    title: str = "",
) -> Path:
    """Figures 2a/6a: one panel per user type; NP-BTL vs N^C, BTL-mixed, the type's oracle (dashed) and,
    when given, the Bayes-optimal predictor that sees the true attributes (dotted)."""
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), sharey=True, squeeze=False)
    styles = {
        "np-btl": ("tab:blue", "-", "o"),
        "btl-mixed": ("tab:gray", "-", "s"),
        "btl-oracle": ("black", "--", None),
        "bayes-optimal": ("tab:green", ":", None),
    }
    for ax, mode in zip(axes[0], modes, strict=True):
        for name, per_mode in models.items():
            curve = per_mode.get(mode)
            if not curve:
                continue
            ks = sorted(int(k) for k in curve)
            color, line, marker = styles.get(name, ("tab:purple", "-", "^"))
            ax.plot(
                ks, [curve[str(k)] for k in ks], color=color, linestyle=line, marker=marker, ms=4, label=name
            )
        ax.axhline(0.5, color="tab:red", lw=0.8, alpha=0.4)
        ax.set_title(f"users preferring higher '{mode}'", fontsize=9)
        ax.set_xlabel("context pairs $N^C$")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on unseen pairs")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_embedding_pca(
    path: str | Path,
    points: Mapping[int, tuple[np.ndarray, np.ndarray]],
    modes: list[str],
    silhouettes: Mapping[int, float | None],
) -> Path:
    """Figures 3/7: 2-D PCA of the user embeddings z for several N^C, coloured by the true type."""
    fig, axes = plt.subplots(1, len(points), figsize=(3.8 * len(points), 3.6), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, (nc, (xy, labels)) in zip(axes[0], points.items(), strict=True):
        for m, name in enumerate(modes):
            sel = labels == m
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.5, color=colors[m % len(colors)], label=name)
        sil = silhouettes.get(nc)
        ax.set_title(f"$N^C$ = {nc}" + (f" (silhouette {sil:.2f})" if sil is not None else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8, markerscale=2)
    return _save(fig, path)


def plot_conflict_rate(
    path: str | Path, accuracy: Mapping[str, Mapping[str, Mapping[str, float]]], context_sizes: list[int]
) -> Path:
    """Figure 5: accuracy on conflicting targets vs the context's conflict rate, per training rate."""
    fig, axes = plt.subplots(
        1, len(context_sizes), figsize=(3.6 * len(context_sizes), 3.4), sharey=True, squeeze=False
    )
    cmap = plt.get_cmap("viridis")
    for ax, nc in zip(axes[0], context_sizes, strict=True):
        for i, (name, per_rate) in enumerate(accuracy.items()):
            rates = sorted(per_rate, key=float)
            ax.plot(
                [float(r) for r in rates],
                [per_rate[r][str(nc)] for r in rates],
                marker="o",
                ms=4,
                color=cmap(i / max(1, len(accuracy) - 1)),
                label=name.replace("train_conflict_rate=", "trained at "),
            )
        ax.axhline(0.5, color="tab:red", lw=0.8, alpha=0.4)
        ax.set_title(f"$N^C$ = {nc}", fontsize=9)
        ax.set_xlabel("context conflict rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (all targets conflict)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_weight_curve(path: str | Path, result: Mapping, context_sizes: list[int]) -> Path:
    """Figure 8a: accuracy vs the user's weight on the first attribute (2-D Dirichlet users), per N^C."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    centers = [(a + b) / 2 for a, b in result["bins"]]
    cmap = plt.get_cmap("viridis")
    for i, nc in enumerate(context_sizes):
        color = cmap(i / max(1, len(context_sizes) - 1))
        for key, style in (
            ("accuracy", {"marker": "o", "ms": 4, "label": f"$N^C$ = {nc}"}),
            ("bayes_accuracy", {"linestyle": "--", "lw": 1, "alpha": 0.8}),
        ):
            values = result.get(key, {}).get(str(nc))
            if values:
                xs = [c for c, a in zip(centers, values, strict=True) if a is not None]
                ax.plot(xs, [a for a in values if a is not None], color=color, **style)
    a0, a1 = result["attributes"][:2]
    ax.set_xlabel(f"user weight on '{a0}' (1 − weight on '{a1}')")
    ax.set_title("solid: NP-BTL; dashed: Bayes-optimal with the true attributes, same tasks", fontsize=8)
    ax.set_ylabel("accuracy on unseen pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_simplex_accuracy(path: str | Path, result: Mapping, context_sizes: list[int], bins: int) -> Path:
    """Figure 8b: accuracy over the 3-D simplex of user weights (triangles of edge 1/bins), per N^C."""
    from matplotlib.collections import PolyCollection

    def corner(w: np.ndarray) -> tuple[float, float]:  # barycentric -> 2-D
        return float(w[1] + w[2] / 2), float(w[2] * np.sqrt(3) / 2)

    polygons = []
    for cell in result["bins"]:
        i, j, up = cell["i"], cell["j"], cell["up"]
        k = bins - 1 - i - j if up else bins - 2 - i - j
        base = np.array([i, j, k], dtype=float)
        if up:
            verts = [base + np.array(d) for d in ([1, 0, 0], [0, 1, 0], [0, 0, 1])]
        else:
            verts = [base + np.array(d) for d in ([1, 1, 0], [1, 0, 1], [0, 1, 1])]
        polygons.append([corner(v / bins) for v in verts])
    fig, axes = plt.subplots(1, len(context_sizes), figsize=(3.3 * len(context_sizes), 3.2), squeeze=False)
    for ax, nc in zip(axes[0], context_sizes, strict=True):
        values = np.array([np.nan if a is None else a for a in result["accuracy"][str(nc)]])
        coll = PolyCollection(
            polygons, array=np.ma.masked_invalid(values), cmap="viridis", edgecolors="white", linewidths=0.3
        )
        coll.set_clim(0.5, 1.0)
        ax.add_collection(coll)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 0.92)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"$N^C$ = {nc}", fontsize=9)
        names = result["attributes"]
        ax.text(0, -0.04, names[0], ha="center", va="top", fontsize=7)
        ax.text(1, -0.04, names[1], ha="center", va="top", fontsize=7)
        ax.text(0.5, 0.88, names[2], ha="center", va="bottom", fontsize=7)
    fig.colorbar(coll, ax=axes[0].tolist(), shrink=0.7, label="accuracy")
    return _save(fig, path)
