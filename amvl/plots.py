"""PNG plots of a demo or training run: learning curves, KL curves, validation curves (the
leakage gap as it grows), the leakage gap of finished models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on our machines
import matplotlib.pyplot as plt  # noqa: E402


def _curves(histories: dict[str, list[dict]], keys: list[str], title: str, ylabel: str,
            path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        _draw_curves(ax, histories, keys, title, ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:  # an unwritable path must not leave the figure open
        plt.close(fig)
    return path


def _draw_curves(ax, histories: dict[str, list[dict]], keys: list[str], title: str,
                 ylabel: str) -> None:
    for index, (name, history) in enumerate(histories.items()):
        for key in keys:
            points = [(e["step"], e[key]) for e in history if key in e]
            if points:
                steps, values = zip(*points)
                label = name if len(keys) == 1 else f"{name} {key}"
                # one colour a run: its keys apart by line style alone
                ax.plot(steps, values, label=label, color=f"C{index % 10}",
                        linestyle="-" if key == keys[0] else "--")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none when no run logged these keys ("none" alone)
        ax.legend(fontsize=8)


def learning_curves(histories: dict[str, list[dict]], out: Path) -> Path:
    """Training NLL of the answer per objective."""
    return _curves(histories, ["nll"], "answer NLL during training", "NLL (nats/token)",
                   out / "learning_curves.png")


def kl_curves(histories: dict[str, list[dict]], out: Path) -> Path:
    """KL(q||p) (solid) and KL(p||q) (dashed) per objective that has a posterior."""
    with_kl = {n: h for n, h in histories.items() if any("kl_fwd" in e for e in h)}
    return _curves(with_kl, ["kl_fwd", "kl_rev"], "KL between posterior and prior",
                   "KL (nats/example)", out / "kl_curves.png")


def validation_curves(histories: dict[str, list[dict]], out: Path) -> Path:
    """Held-out answer NLL decoded from the latents the objective trains on (solid) and from
    the prior's means, as inference decodes (dashed): a posterior that leaks the answer
    widens the gap between them as training goes on."""
    return _curves(histories, ["eval/nll", "eval/nll_prior"],
                   "held-out answer NLL: training latents vs prior means", "NLL (nats/token)",
                   out / "validation_curves.png")


def run_plots(histories: dict[str, list[dict]], out: Path) -> list[Path]:
    """The plots of training histories (``amvl train``'s ``history.jsonl``, one per run
    name) that have something to show, written into ``out``: learning curves where a run
    logged its training NLL; KL curves where a run has a posterior; validation curves where a
    run validated. Raises ValueError when there is nothing to draw."""
    def logged(key: str) -> bool:
        return any(key in entry for history in histories.values() for entry in history)

    drawn = [draw for key, draw in (("nll", learning_curves), ("kl_fwd", kl_curves),
                                    ("eval/nll", validation_curves)) if logged(key)]
    if not drawn:
        raise ValueError("nothing to plot: no training NLL, KL or validation entries")
    out.mkdir(parents=True, exist_ok=True)
    return [draw(histories, out) for draw in drawn]


def leakage_gap(reports: dict[str, dict], out: Path) -> Path:
    """Accuracy with prior latents vs posterior latents per objective, and chance."""
    if not reports:
        raise ValueError("leakage_gap needs at least one report")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    path = out / "leakage_gap.png"
    try:
        _draw_leakage_gap(ax, reports)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _draw_leakage_gap(ax, reports: dict[str, dict]) -> None:
    names = list(reports)
    prior = [reports[n]["acc_prior"] for n in names]
    posterior = [reports[n]["acc_posterior"] for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], prior, width=0.4, label="prior latents (inference)")
    ax.bar([x + 0.2 for x in xs], [0 if p != p else p for p in posterior], width=0.4,
           label="posterior latents (sees the answer)")
    chance = reports[names[0]].get("chance")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xticks(list(xs), names)
    ax.set(title="leakage gap: posterior minus prior accuracy", ylabel="test accuracy",
           ylim=(0, 1))
    ax.legend(fontsize=8)
