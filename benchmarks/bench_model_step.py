"""One AMVL training step (forward + backward), prefix-shared vs naive vs plain fine-tuning.

Shapes: BLINK-style (prefix 1,536 tokens, answer 64, K = 16) and prefix:answer 4:1 (1,024:256,
K = 16). Models, randomly initialised from configs: on a GPU (bf16, batch 4) a Qwen2-0.5B-shaped
model and a 7B-shaped proxy (Qwen2-7B widths, 4 layers); on the CPU (fp32, batch 1, so that a
2-core machine finishes in minutes) Qwen2-0.5B widths with 2 layers. CPU times are only good for
ratios between providers.

Providers: "plain" is the base model's own causal-LM step on ``[x | y]`` on SDPA (what
fine-tuning without latents costs); "naive" and "shared" are AMVLModel steps with the amvl
objective on the naive and the prefix-shared path, on SDPA with dense masks; "shared_amvl" is
the prefix-shared path on the "amvl" attention (layouts, no dense masks: the Triton kernel on a
GPU, SDPA with the causal rows split off on the CPU). Targets: shared <= 0.6x naive at both
shapes; at the BLINK-style shape, shared <= 1.15x plain (its token count alone is 1.07x).
The three AMVL providers compute the same loss from the same noise: each row records its
``loss``, ``nll``, ``kl_fwd`` and ``kl_rev``, and the test fails when one is off (a broken
path's speed means nothing). The answer's NLL is checked on its own: the KLs of random heads
make up 99% of the loss, so a loss check alone would miss a wrong answer path. Timing: the
providers take turns in a balanced order, one step each per round, 12 rounds on a GPU (CUDA
events around each step) and 7 on the CPU, after a warm-up; medians of the rounds.

``test_model_step_compiled`` (bench ``model_step_compiled``) times plain fine-tuning and the
prefix-shared step on the "amvl" attention through ``torch.compile`` beside the same two
eager, side by side: compiling turns a step's host work (a Python call and an autograd node per
operator) into Inductor's wrapper code, which matters where the eager step waits on its host.
Its compiled AMVL row must compute the eager row's loss, NLL and KLs. Select with ``-k
compiled`` or ``-k "not compiled"`` (compiling takes a minute or two on a GPU).

    python -m pytest benchmarks/bench_model_step.py --benchmark
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from amvl.config import AMVLConfig
from amvl.model import AMVLModel
from amvl.tiny import word_tokenizer
from amvl.trainer import CUDA_GRAPH_COMPILE_MODES
from benchmarks import common

ON_GPU = torch.cuda.is_available()
BATCH = 4 if ON_GPU and not common.SMOKE else 1
SHAPES = {"blink": (1536, 64), "4to1": (1024, 256)}
if common.SMOKE:
    SHAPES = {"blink": (48, 4), "4to1": (32, 8)}
K = 4 if common.SMOKE else 16

QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                num_key_value_heads=4)
MODELS = {
    "qwen2-0.5b": dict(QWEN2_0_5B, num_hidden_layers=24),
    "7b-proxy": dict(QWEN2_7B, num_hidden_layers=4),
}
if not ON_GPU:
    MODELS = {"qwen2-0.5b-2layers": dict(QWEN2_0_5B, num_hidden_layers=2)}
if common.SMOKE:
    MODELS = {"tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)}

_CACHE: dict[str, tuple] = {}


def _model(name: str):
    """(base model, tokenizer) built once per session, bf16 on a GPU."""
    if name not in _CACHE:
        torch.manual_seed(0)
        tokenizer = word_tokenizer([f"w{i}" for i in range(1000)])
        config = Qwen2Config(vocab_size=len(tokenizer) + 8, max_position_embeddings=4096,
                             **MODELS[name])
        device = common.bench_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        base = Qwen2ForCausalLM(config).to(device, dtype)
        base.set_attn_implementation("sdpa")
        _CACHE[name] = (base, tokenizer)
    return _CACHE[name]


def _batch(prefix: int, answer: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab - 10, (BATCH, prefix + answer), generator=g).to(device)
    ones = torch.ones_like(ids, dtype=torch.bool)
    return {"prompt_ids": ids[:, :prefix], "prompt_mask": ones[:, :prefix],
            "answer_ids": ids[:, prefix:], "answer_mask": ones[:, prefix:]}


PROVIDERS = ("plain", "naive", "shared", "shared_amvl")
GPU_ROUNDS = 2 if common.SMOKE else 12  # a multiple of 4 providers: balanced orders
# How far the shared paths' figures may be from the naive path's. Relative, for the loss and
# the KLs: bf16 rounding in another order of operations moves them by about 1e-3. Absolute
# nats, for the answer's NLL (about 7 nats on the random models): bf16 rounding moves the
# mean over 256 tokens by well under 0.02; a position off by one in the answer pass moved it
# by 0.04 in fp32 (a random model is nearly uniform, so any error moves it little).
LOSS_TOLERANCE = 1e-4 if not ON_GPU else 2e-2
NLL_TOLERANCE = 1e-4 if not ON_GPU else 2e-2


def _steps(base, tokenizer, prefix: int, answer: int, device) -> tuple[dict, dict]:
    """One training-step closure per provider, each selecting its attention first, and the
    loss, NLL and KLs of each AMVL provider."""
    import amvl_kernels.hf as akhf

    config = AMVLConfig(num_slots=K, latent_dim=64, kernel_backend="auto")
    model = AMVLModel(base, tokenizer, config).to(base.dtype)
    batch = _batch(prefix, answer, len(tokenizer), device)
    params = [p for p in model.parameters() if p.requires_grad]
    base_params = [p for p in base.parameters() if p.requires_grad]
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], 1)
    labels = ids.clone()
    labels[:, :prefix] = -100

    def plain():
        base.set_attn_implementation("sdpa")
        return torch.autograd.grad(base(input_ids=ids, labels=labels).loss, base_params)

    def latent_step(share: bool, amvl_attention: bool):
        if amvl_attention:
            akhf.use_amvl_attention(base)
        else:
            base.set_attn_implementation("sdpa")
        return model(**batch, seed=0, prefix_sharing=share)

    def latent(share: bool, amvl_attention: bool):
        def step():
            loss = latent_step(share, amvl_attention).loss
            return torch.autograd.grad(loss, params, allow_unused=True)
        step.model = model  # for scripts/profile_model_step.py's variants of a step
        return step

    paths = {"naive": (False, False), "shared": (True, False), "shared_amvl": (True, True)}
    figures = {}
    for name, path in paths.items():
        metrics = latent_step(*path).metrics
        figures[name] = {key: metrics[key] for key in ("loss", "nll", "kl_fwd", "kl_rev")}
    steps = {"plain": plain, **{name: latent(*path) for name, path in paths.items()}}
    return steps, figures


def compiled_steps(base, model, tokenizer, prefix: int, answer: int, device,
                   mode: str | None = None) -> dict:
    """``plain`` and ``shared_amvl`` through ``torch.compile`` (the base model's forward for
    plain fine-tuning, AMVLModel's for ours, as a Trainer with ``torch_compile=True`` runs
    them), on the batch of :func:`_steps`: one graph for each forward and its backward.
    Each compiles on its first call; the AMVL closure's ``.figures()`` runs a forward and
    returns its loss, NLL and KLs, to check against the eager step's. ``mode``:
    torch.compile's (e.g. "reduce-overhead", CUDA graphs on a GPU)."""
    import amvl_kernels.hf as akhf

    batch = _batch(prefix, answer, len(tokenizer), device)
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], 1)
    labels = ids.clone()
    labels[:, :prefix] = -100
    base_params = [p for p in base.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    compiled_base = torch.compile(base, mode=mode)
    compiled_model = torch.compile(model, mode=mode)

    def plain_compiled():
        base.set_attn_implementation("sdpa")
        return torch.autograd.grad(compiled_base(input_ids=ids, labels=labels).loss, base_params)

    # CUDA graphs read the step and the seed as tensors, as AMVLTrainer passes them there
    graphed = mode in CUDA_GRAPH_COMPILE_MODES
    step = torch.tensor(0, device=device) if graphed else 0
    seed = torch.tensor([0], device=device) if graphed else 0

    def forward():
        akhf.use_amvl_attention(base)
        return compiled_model(**batch, step=step, seed=seed, prefix_sharing=True)

    def shared_amvl_compiled():
        return torch.autograd.grad(forward().loss, params, allow_unused=True)

    def figures() -> dict[str, float]:
        metrics = forward().metrics
        return {key: metrics[key] for key in ("loss", "nll", "kl_fwd", "kl_rev")}

    shared_amvl_compiled.figures = figures
    return {"plain_compiled": plain_compiled, "shared_amvl_compiled": shared_amvl_compiled}


def path_differences(figures: dict[str, dict[str, float]], provider: str,
                     reference: str = "naive") -> dict[str, float]:
    """How far ``provider``'s figures are from ``reference``'s (the naive path's): relative
    for the loss and the KLs, absolute nats for the NLL."""
    ref, ours = figures[reference], figures[provider]
    out = {key: abs(ours[key] - ref[key]) / max(abs(ref[key]), 1e-12)
           for key in ("loss", "kl_fwd", "kl_rev")}
    out["nll"] = abs(ours["nll"] - ref["nll"])
    return out


def off_limits(figures: dict[str, dict[str, float]], provider: str,
               reference: str = "naive") -> dict[str, float]:
    """The figures of ``provider`` further from ``reference``'s than the tolerances allow."""
    limits = {"loss": LOSS_TOLERANCE, "kl_fwd": LOSS_TOLERANCE, "kl_rev": LOSS_TOLERANCE,
              "nll": NLL_TOLERANCE}
    off = path_differences(figures, provider, reference)
    return {key: value for key, value in off.items() if not value <= limits[key]}


def _time_and_record(bench: str, steps: dict, figures: dict, model_name: str, shape: str,
                     benchmark) -> str:
    """Time ``steps`` side by side and record a row per provider under ``bench``; returns
    the case's name. A step takes tens of ms on a GPU, where do_bench would take about five
    samples of each provider in turn: the providers take turns instead, one step each per
    round (a compiled step compiles in the warm-up's first call)."""
    prefix, answer = SHAPES[shape]
    medians = common.time_ms_side_by_side(steps, warmup=100, cpu_rounds=7, gpu_rounds=GPU_ROUNDS)
    tokens = BATCH * (prefix + answer)
    case = f"{model_name} {shape} prefix={prefix} answer={answer} K={K} B={BATCH}"
    for provider, step in steps.items():
        peak = common.peak_memory_bytes(step) / 2**20
        common.record(bench, case, provider, medians[provider], peak_MB=peak,
                      tokens_per_s=tokens / medians[provider] * 1e3,
                      **figures.get(provider, {}))
    benchmark.extra_info.update(medians)
    return case


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_step(benchmark, bench_device, model_name, shape):
    base, tokenizer = _model(model_name)
    steps, figures = _steps(base, tokenizer, *SHAPES[shape], bench_device)
    case = _time_and_record("model_step", {name: steps[name] for name in PROVIDERS}, figures,
                            model_name, shape, benchmark)
    for provider in ("shared", "shared_amvl"):
        wrong = off_limits(figures, provider)
        assert not wrong, f"{provider} is off the naive path on {case}: {wrong}; {figures}"
    benchmark.pedantic(steps["shared_amvl"], rounds=1, warmup_rounds=0)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_step_compiled(benchmark, bench_device, model_name, shape):
    base, tokenizer = _model(model_name)
    eager, figures = _steps(base, tokenizer, *SHAPES[shape], bench_device)
    compiled = compiled_steps(base, eager["shared_amvl"].model, tokenizer, *SHAPES[shape],
                              bench_device)
    figures["shared_amvl_compiled"] = compiled["shared_amvl_compiled"].figures()
    steps = {"plain": eager["plain"], "plain_compiled": compiled["plain_compiled"],
             "shared_amvl": eager["shared_amvl"],
             "shared_amvl_compiled": compiled["shared_amvl_compiled"]}
    case = _time_and_record("model_step_compiled", steps, figures, model_name, shape, benchmark)
    wrong = off_limits(figures, "shared_amvl_compiled", reference="shared_amvl")
    assert not wrong, f"the compiled step is off the eager one on {case}: {wrong}; {figures}"
    benchmark.pedantic(steps["shared_amvl_compiled"], rounds=1, warmup_rounds=0)
