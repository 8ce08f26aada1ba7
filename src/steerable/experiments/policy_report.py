"""Tables and figures shared by the NP-DPO studies (``npdpo-synthetic``, ``npdpo-hh``).

``models`` is the studies' ``results["models"]``: ``{"np-dpo": {"accuracy": {group: {"<N^C>": acc}}},
"btl-dpo": {"accuracy": {group: {"0": acc}}}}``, a group being a hidden user type.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from steerable.experiments.common import console


def plot_policy_accuracy(
    ax: Any, models: dict[str, Any], groups: list[str], sizes: list[int], ylabel: str, errors: bool = False
) -> None:
    """NP-DPO's implicit-reward accuracy vs N^C per group (solid; ± 1 standard error with ``errors``),
    the per-type oracle DPO (dashed, when present; dash-dotted: the oracle that also learned from the other
    type's pairs with the labels swapped) and BTL-DPO (dotted) on one axis."""
    for k, group in enumerate(groups):
        curve = models["np-dpo"]["accuracy"].get(group, {})
        xs = [n for n in sizes if str(n) in curve]
        ys = [curve[str(n)] for n in xs]
        se = models["np-dpo"].get("stderr", {}).get(group, {}) if errors else {}
        if se:
            ax.errorbar(
                xs,
                ys,
                yerr=[se.get(str(n), 0.0) for n in xs],
                fmt="o-",
                color=f"C{k}",
                capsize=3,
                label=f"NP-DPO, {group}",
            )
        else:
            ax.plot(xs, ys, "o-", color=f"C{k}", label=f"NP-DPO, {group}")
        oracle = models.get("oracle-dpo", {}).get("accuracy", {}).get(group, {}).get("0")
        if oracle is not None:
            ax.axhline(oracle, color=f"C{k}", ls="--", label=f"oracle DPO, {group}")
        mirrored = models.get("oracle-dpo-mirrored", {}).get("accuracy", {}).get(group, {}).get("0")
        if mirrored is not None:
            ax.axhline(mirrored, color=f"C{k}", ls="-.", label=f"mirrored oracle DPO, {group}")
        btl = models.get("btl-dpo", {}).get("accuracy", {}).get(group, {}).get("0")
        if btl is not None:
            ax.axhline(btl, color=f"C{k}", ls=":", label=f"BTL-DPO, {group}")
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set(xlabel="context pairs N^C", ylabel=ylabel, ylim=(0, 1.02))
    ax.legend(fontsize=8)


def plot_training(
    out: Path, filename: str = "npdpo_training.png", runs: list[str] | tuple[str, ...] = ("np-dpo", "btl-dpo")
) -> None:
    """Training-batch accuracy and chosen / rejected log-ratios from ``out/<run>/metrics.csv``, and the
    validation users' accuracy of a run that selected its checkpoint on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k, name in enumerate(runs):
        color = {"np-dpo": "C2", "btl-dpo": "C7"}.get(name, f"C{k + 3}")
        path = out / name / "metrics.csv"
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        step = [float(r["step"]) for r in rows]
        axes[0].plot(
            step, [float(r["rewards/accuracies"]) for r in rows], color=color, label=f"{name} (batch)"
        )
        selection = _selection(out / name)
        if selection:  # validation users' accuracy, the kept step starred
            steps = [row["step"] for row in selection["history"]]
            accuracy = [row["accuracy"] for row in selection["history"]]
            axes[0].plot(steps, accuracy, color=color, ls=":", marker="o", ms=3, label=f"{name} validation")
            best = selection["best_step"]
            axes[0].plot([best], [selection["best_accuracy"]], color=color, marker="*", ms=12, ls="none")
        for key, style in (("logratio/chosen", "-"), ("logratio/rejected", "--")):
            label = f"{name} {key.split('/')[1]}"
            axes[1].plot(step, [float(r[key]) for r in rows], color=color, ls=style, label=label)
    axes[0].set(xlabel="step", ylabel="implicit-reward accuracy")
    axes[1].set(xlabel="step", ylabel="log π/π_ref (nats)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / filename, dpi=120)
    plt.close(fig)


def _selection(run: Path) -> dict[str, Any] | None:
    """The checkpoint selection a run recorded in its train_config.json (None: it kept its last step)."""
    path = run / "train_config.json"
    if not path.exists():
        return None
    selection = json.loads(path.read_text(encoding="utf-8")).get("selection")
    return selection if selection and selection.get("best_step") is not None else None


def print_policy_table(title: str, models: dict[str, Any], groups: list[str], sizes: list[int]) -> None:
    """One row per (model, group), one column per N^C (BTL-DPO has N^C = 0 only)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model / type")
    for n in sizes:
        table.add_column(f"N^C={n}", justify="right")
    for group in groups:
        curve = models["np-dpo"]["accuracy"].get(group, {})
        table.add_row(
            f"np-dpo / {group}", *[f"{curve[str(n)]:.3f}" if str(n) in curve else "" for n in sizes]
        )
        for other in ("oracle-dpo", "oracle-dpo-mirrored", "btl-dpo"):
            value = models.get(other, {}).get("accuracy", {}).get(group, {}).get("0")
            if value is not None:
                table.add_row(f"{other} / {group}", f"{value:.3f}", *["" for _ in sizes[1:]])
    console.print(table)
