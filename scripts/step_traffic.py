"""Memory traffic and matrix-product FLOPs of one training step, per provider, counted on any
device.

A GPU lease is short and not every session has one. The bytes a step moves through operators
other than matrix products (elementwise work, casts, copies, reductions: bound by memory on a
GPU) and the FLOPs of its matrix products (bound by compute) do not depend on the device, so
they can be counted on the CPU at a GPU model's full widths. This script runs one step of
each provider of ``benchmarks/bench_model_step.py`` under a ``TorchDispatchMode`` that records
every ATen operator with its tensors' bytes (each input read once, each output written once;
views move nothing; an embedding lookup reads the rows it gathers), on models of 1 and 2
decoder layers, and prints what one decoder layer and what the rest of the model
(embeddings, loss, heads, the latent draw) add over the first provider, operator by operator.
It also measures each step's peak memory of the tensors it allocates (``torch.profiler``'s
allocation records on the CPU), per layer and for the rest.

Where the GPU runs other operators than the CPU, so does the count: the "amvl" attention runs
SDPA and masks on the CPU and our Triton kernels on a GPU, so the attention's own rows here say
nothing about the GPU's.

    python scripts/step_traffic.py                          # the 7B proxy's widths, bf16
    AMVL_BENCH_SMOKE=1 python scripts/step_traffic.py       # the harness's tiny model
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import bench_model_step as bms  # noqa: E402
from benchmarks import common  # noqa: E402

# Operators that return views or allocate without writing: they move no data.
MOVES_NOTHING = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute",
    "expand", "slice", "select", "narrow", "unsqueeze", "squeeze", "split",
    "split_with_sizes", "unbind", "as_strided", "diagonal", "detach", "alias", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
}
MATRIX_PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}
# operator, first output's shape with all but its last size left out (so that a pass over
# more tokens compares with a shorter one), its dtype
Key = tuple[str, str, str]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shape(t: torch.Tensor) -> str:
    return "[" + "*, " * (t.dim() - 1) + (str(t.shape[-1]) if t.dim() else "") + "]"


class TrafficCount(TorchDispatchMode):
    """Per (operator, first output's shape, dtype; see ``Key``): calls, bytes moved
    (operators other than matrix products) and matrix-product FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Key] = Counter()
        self.bytes: Counter[Key] = Counter()
        self.flops: Counter[Key] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in MOVES_NOTHING:
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        key = (name, _shape(outs[0]) if outs else "-",
               str(outs[0].dtype).removeprefix("torch.") if outs else "-")
        self.calls[key] += 1
        if name in MATRIX_PRODUCTS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.flops[key] += 2 * a.numel() * b.shape[-1]
        elif name == "embedding":  # reads the rows it gathers, not the whole table
            self.bytes[key] += 2 * _bytes(outs[0]) + _bytes(args[1])
        else:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            self.bytes[key] += sum(_bytes(t) for t in tensors + outs)
        return out


def count_steps(widths: dict, layers: int, providers: list[str], prefix: int, answer: int,
                dtype: torch.dtype, vocab: int | None = None
                ) -> tuple[dict[str, TrafficCount], dict[str, int]]:
    """One counted step per provider, after an uncounted one, on a model of ``layers``, its
    embedding tables grown to ``vocab`` rows if given (the batch's tokens stay in the
    benchmark's first thousand); and each step's peak bytes of tensors it allocated."""
    bms.MODELS["counted"] = dict(widths, num_hidden_layers=layers)
    bms._CACHE.pop("counted", None)
    base, tokenizer = bms._model("counted")
    if vocab is not None:
        base.resize_token_embeddings(vocab, mean_resizing=False)
    base.to(dtype)
    steps, _ = bms._steps(base, tokenizer, prefix, answer, base.device)
    counts, peaks = {}, {}
    for name in providers:
        steps[name]()
        counts[name] = TrafficCount()
        with counts[name]:
            steps[name]()
        peaks[name] = common.peak_memory_bytes(steps[name])
    del bms.MODELS["counted"], bms._CACHE["counted"]
    return counts, peaks


def split_per_layer(one: TrafficCount, two: TrafficCount) -> tuple[Counter, Counter]:
    """(bytes of one decoder layer, bytes of everything else) from the counts of a 1-layer
    and a 2-layer model of the same widths."""
    layer, rest = Counter(), Counter()
    for key in one.bytes.keys() | two.bytes.keys():
        layer[key] = two.bytes[key] - one.bytes[key]
        rest[key] = one.bytes[key] - layer[key]
    return layer, rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="7b-proxy",
                        help=f"widths of {sorted(bms.MODELS)} or '7b-proxy'")
    parser.add_argument("--shape", default="blink", choices=list(bms.SHAPES))
    parser.add_argument("--providers", default="plain,shared_amvl",
                        help=f"comma-separated, first is the baseline, of {bms.PROVIDERS}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--vocab", type=int, help="embedding rows (the benchmark's: 1,008; "
                        "Qwen2-7B's: 152,064)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per part")
    args = parser.parse_args()
    providers = args.providers.split(",")
    if set(providers) - set(bms.PROVIDERS) or len(providers) < 2:
        parser.error(f"--providers needs two or more of {bms.PROVIDERS}, got {providers}")
    widths = {"7b-proxy": bms.QWEN2_7B}
    widths.update({name: {k: v for k, v in w.items() if k != "num_hidden_layers"}
                   for name, w in bms.MODELS.items()})
    if args.model not in widths:
        parser.error(f"--model: one of {sorted(widths)}")

    prefix, answer = bms.SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    (one, peak_one), (two, peak_two) = (
        count_steps(widths[args.model], layers, providers, prefix, answer, dtype, args.vocab)
        for layers in (1, 2))
    vocab = f", vocabulary {args.vocab}" if args.vocab else ""
    print(f"{args.model} widths{vocab}, {args.shape} (prefix {prefix}, answer {answer}), "
          f"batch {bms.BATCH}, {args.dtype}, counted on {common.device_info()['device']}")
    print(f"{'provider':<14}{'MB a layer':>12}{'MB the rest':>13}{'GFLOP a layer':>15}"
          f"{'GFLOP the rest':>16}{'peak MB a layer':>17}{'peak MB the rest':>18}")
    parts = {}
    for name in providers:
        parts[name] = split_per_layer(one[name], two[name])
        layer_flops = sum(two[name].flops.values()) - sum(one[name].flops.values())
        rest_flops = sum(one[name].flops.values()) - layer_flops
        print(f"{name:<14}{sum(parts[name][0].values()) / 1e6:>12.1f}"
              f"{sum(parts[name][1].values()) / 1e6:>13.1f}{layer_flops / 1e9:>15.1f}"
              f"{rest_flops / 1e9:>16.1f}{(peak_two[name] - peak_one[name]) / 1e6:>17.1f}"
              f"{(2 * peak_one[name] - peak_two[name]) / 1e6:>18.1f}")
    for name in providers[1:]:
        for part, title in ((0, "a decoder layer"), (1, "the rest of the model")):
            ours, theirs = parts[name][part], parts[providers[0]][part]
            growth = sorted(((ours[k] - theirs[k], k) for k in ours.keys() | theirs.keys()),
                            key=lambda row: -abs(row[0]))
            print(f"\nMB moved in {title}, {name} against {providers[0]}: "
                  f"{(sum(ours.values()) - sum(theirs.values())) / 1e6:+.1f} in all")
            for delta, (op, shape, dt) in growth[:args.rows]:
                print(f"  {delta / 1e6:+10.1f}  {op:<36} {shape:<22} {dt}")


if __name__ == "__main__":
    main()
