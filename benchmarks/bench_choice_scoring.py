"""Scoring a multiple-choice batch from prior latents, as ``amvl eval`` does on BLINK.

Providers: "per_choice" is the prior's pass (``heads``) and then one full pass of
``[x | latent block | choice]`` per choice (``answer_nll``), what ``prior_choice_nll`` ran
before; "one_encoding" is ``AMVLModel.choices_nll``, x encoded once in the prior's pass and
each choice decoded after its cache. Shape: BLINK-style, a prompt of 1,536 tokens (an image
and a question) and 4 choices of 4 tokens, K = 16. The models and dtypes are those of
``bench_model_step.py`` (CPU times are only good for the ratio). Both providers must give the
same NLLs: each row records the largest difference from the other's, and the test fails when
it is off.

    python -m pytest benchmarks/bench_choice_scoring.py --benchmark
"""

from __future__ import annotations

import pytest
import torch

from amvl.config import AMVLConfig
from amvl.model import AMVLModel
from benchmarks import common
from benchmarks.bench_model_step import BATCH, K, MODELS, ON_GPU, _model

PROMPT, CHOICES, CHOICE_TOKENS = (48, 4, 2) if common.SMOKE else (1536, 4, 4)
# bf16 rounding in another order of operations moves a mean NLL of a random model (about 7
# nats) by well under 0.02; in fp32 the two paths agree to rounding
NLL_TOLERANCE = 2e-2 if ON_GPU else 1e-4


def _inputs(vocab: int, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(10, vocab - 10, (BATCH, PROMPT), generator=g).to(device)
    answers = [torch.randint(10, vocab - 10, (BATCH, CHOICE_TOKENS), generator=g).to(device)
               for _ in range(CHOICES)]
    ones = torch.ones_like(answers[0], dtype=torch.bool)
    return prompt, torch.ones_like(prompt, dtype=torch.bool), [(a, ones) for a in answers]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_choice_scoring(benchmark, bench_device, model_name):
    base, tokenizer = _model(model_name)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=K, latent_dim=64)).to(
        bench_device, base.dtype).eval()
    prompt_ids, prompt_mask, answers = _inputs(base.config.vocab_size, bench_device)

    @torch.no_grad()
    def per_choice() -> torch.Tensor:
        z = model.heads(prompt_ids, prompt_mask)["mu_p"]
        return torch.stack([model.answer_nll(prompt_ids, prompt_mask, *answer, z=z)
                            for answer in answers], 1)

    @torch.no_grad()
    def one_encoding() -> torch.Tensor:
        return model.choices_nll(prompt_ids, prompt_mask, answers)

    providers = {"per_choice": per_choice, "one_encoding": one_encoding}
    gap = float((one_encoding().float() - per_choice().float()).abs().max())
    medians = common.time_ms_side_by_side(providers, warmup=100, cpu_rounds=7,
                                          gpu_rounds=2 if common.SMOKE else 12)
    case = (f"{model_name} prompt={PROMPT} choices={CHOICES}x{CHOICE_TOKENS} K={K} "
            f"B={BATCH}")
    for provider, fn in providers.items():
        common.record("choice_scoring", case, provider, medians[provider],
                      peak_MB=common.peak_memory_bytes(fn) / 2**20, max_nll_gap=gap)
    benchmark.extra_info.update(medians)
    assert gap <= NLL_TOLERANCE, f"the two providers' NLLs differ by {gap} on {case}"
    benchmark.pedantic(one_encoding, rounds=1, warmup_rounds=0)
