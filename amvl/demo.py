"""``amvl demo``: train none / prior / elbo / amvl on the built-in puzzles and compare them.

Every objective starts from the same randomly initialised tiny Qwen2-VL (built from a config,
word-level tokenizer built offline) and sees the same batches in the same order. The test split
is then scored with :func:`amvl.diagnostics.leakage_report`. Printed: prior-latent accuracy per
family and mean, posterior-latent accuracy, the leakage gap, the KLs and the flip rates.
Written to ``--out``: ``results.json`` and PNG plots (learning curves, KL curves, leakage gap).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from amvl import plots
from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.diagnostics import leakage_report
from amvl.model import AMVLModel
from amvl.puzzles import FAMILIES, puzzle_suite, vocabulary
from amvl.tiny import tiny_image_processor, tiny_qwen2_vl, word_tokenizer
from amvl.training import TrainConfig, train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OBJECTIVES = ("none", "prior", "elbo", "amvl")


@dataclass
class DemoConfig:
    """The embedded default: under 6 minutes for all four objectives on one CPU thread.

    The same budget and settings for every objective; only the objective differs. The
    numbers were sized on the 2-core development machine (README "Results of `amvl demo`"):

    - ``steps`` x ``batch_size`` = 500 x 64 puzzles per objective: 60-90 s of training
      each on one thread. Batches of 64 amortise a tiny model's per-step overhead (2.3 ms per
      puzzle against 2.8 ms at 32), so the same time sees more puzzles.
    - ``learning_rate`` 3e-3: 6e-3 learned less and 1.2e-2 diverged for the plain model.
    - ``test_per_family`` 100: one standard error of a family's accuracy is then about
      4-5 points instead of 6.
    - ``alpha``, ``beta`` and everything in :class:`~amvl.config.AMVLConfig` (``logvar_init``
      0, constant KL weight, no free bits): the package defaults, not tuned. At this scale the
      posterior collapses onto the prior under elbo and amvl alike; log-variance -4, KL
      warm-up, free bits and KL weights 0.1 / 0.5 did not change that in exploratory runs, so
      none of them is switched on here. ``amvl_overrides`` is the place to try them.
    """

    objectives: tuple[str, ...] = OBJECTIVES
    train_per_family: int = 300
    test_per_family: int = 100
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    num_slots: int = 4
    latent_dim: int = 16
    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0
    amvl_overrides: dict = field(default_factory=dict)
    backbone: str = "tiny"
    """"tiny": a random tiny Qwen2-VL (hidden_size, layers). "smollm2": SmolLM2-135M's weights
    as the text model (:mod:`amvl.smollm2`; over 1000x the tiny model's compute, meant for
    a GPU or a few steps)."""


def chance_accuracy(examples: list[dict]) -> float:
    """The accuracy of guessing uniformly among each example's ``choices``, averaged over
    ``examples``."""
    return sum(1 / len(ex["choices"]) for ex in examples) / len(examples)


def run_objective(name: str, config: DemoConfig, tokenizer: PreTrainedTokenizerBase,
                  train_set: list[dict], test_set: list[dict], progress: bool = True) -> dict:
    """Train one objective from the shared initialisation; return its history and report.
    ``tokenizer`` is left as it is: the model gets a copy."""
    # Building an AMVLModel adds the latent tokens to its tokenizer: on a shared one the next
    # objective's tiny model was built over a larger vocabulary, from other random weights.
    tokenizer = copy.deepcopy(tokenizer)
    torch.manual_seed(config.seed)
    if config.backbone == "smollm2":
        from amvl.smollm2 import smollm2_qwen2_vl

        base, tokenizer = smollm2_qwen2_vl()
    else:
        base = tiny_qwen2_vl(tokenizer, hidden=config.hidden_size, layers=config.layers)
    base.set_attn_implementation("sdpa")
    amvl_config = AMVLConfig(num_slots=config.num_slots, latent_dim=config.latent_dim,
                             objective=name, alpha=config.alpha, beta=config.beta,
                             kernel_backend="auto", **config.amvl_overrides)
    model = AMVLModel(base, tokenizer, amvl_config)
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config), cache_images=True,
                            special_tokens=amvl_config.special_tokens())
    started = time.perf_counter()
    history = train(model, collator, train_set,
                    TrainConfig(steps=config.steps, batch_size=config.batch_size,
                                learning_rate=config.learning_rate, lr_scheduler="cosine",
                                warmup_steps=config.steps // 20, seed=config.seed,
                                log_every=max(1, config.steps // 30)),
                    progress=progress)
    train_seconds = time.perf_counter() - started
    report = leakage_report(model, collator, test_set, batch_size=100, seed=config.seed,
                            progress=False, group_key="family")
    report["chance"] = chance_accuracy(test_set)
    return {"history": history, "report": report, "train_seconds": train_seconds}


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per objective, accuracies in percent."""
    def pct(v: float) -> str:
        return "-" if v != v else f"{100 * v:.1f}"

    def num(v: float) -> str:
        return "-" if v != v else f"{v:.2f}"

    head = ["objective", *FAMILIES, "mean (prior z)", "posterior z", "leak gap",
            # the bars escaped: a bare | would split the cell (as in the README's table)
            "KL(q\\|\\|p)", "KL(p\\|\\|q)", "flip 0", "flip noise", "flip swap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in results.items():
        r = result["report"]
        cells = [name, *(pct(r.get(f"acc_prior/{f}", float("nan"))) for f in FAMILIES),
                 pct(r["acc_prior"]), pct(r["acc_posterior"]), pct(r["leakage_gap"]),
                 num(r.get("kl_fwd", float("nan"))), num(r.get("kl_rev", float("nan"))),
                 pct(r["flip_zeroed"]), pct(r["flip_noised"]), pct(r["flip_swapped"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(out: str | Path, config: DemoConfig | None = None, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Run the whole demo; write results.json and the plots into ``out``; return the results."""
    config = config or DemoConfig()
    unknown = [name for name in config.objectives if name not in OBJECTIVES]
    if unknown or not config.objectives:
        raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, "
                         f"got {list(config.objectives)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_set = puzzle_suite("train", config.train_per_family, seed=config.seed)
    test_set = puzzle_suite("test", config.test_per_family, seed=config.seed)
    if config.backbone not in ("tiny", "smollm2"):
        raise ValueError(f"backbone must be 'tiny' or 'smollm2', got {config.backbone!r}")
    # the SmolLM2 backbone brings its own tokenizer (built per objective with the model)
    tokenizer = word_tokenizer(vocabulary(), vision=True)
    echo(f"amvl demo: {len(train_set)} training and {len(test_set)} test puzzles in "
         f"{len(FAMILIES)} families; objectives {', '.join(config.objectives)}; "
         f"{config.steps} steps each; chance accuracy {100 * chance_accuracy(test_set):.1f}%")
    results = {}

    def payload() -> dict:
        return {"config": asdict(config), "results": results, "table": format_table(results),
                "seconds": time.perf_counter() - started,
                "versions": {"python": platform.python_version(), "torch": torch.__version__}}

    for name in config.objectives:
        results[name] = run_objective(name, config, tokenizer, train_set, test_set, progress)
        r = results[name]["report"]
        echo(f"  {name:<6} prior-latent accuracy {100 * r['acc_prior']:.1f}%  "
             f"({results[name]['train_seconds']:.0f} s)")
        # after every objective, so a run stopped later keeps what it finished
        _write_json(out / "results.json", payload())
    final = payload()
    echo("\n" + final["table"])
    figures = [plots.learning_curves({n: r["history"] for n, r in results.items()}, out),
               plots.kl_curves({n: r["history"] for n, r in results.items()}, out),
               plots.leakage_gap({n: r["report"] for n, r in results.items()}, out)]
    _write_json(out / "results.json", final)
    echo(f"\nwrote {out / 'results.json'} and {', '.join(f.name for f in figures)} "
         f"in {final['seconds']:.0f} s")
    return final


def _write_json(path: Path, payload: dict) -> None:
    """Strict JSON (NaN, e.g. a "none" run's KLs, and infinities become null), replaced
    atomically."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(strict(payload), indent=1, allow_nan=False))
    partial.replace(path)
