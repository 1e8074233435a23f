"""Worker for tests/test_training.py and tests/test_stopping.py: ``amvl.training.train`` on 2
CPU processes (torchrun, ``ACCELERATE_USE_CPU=1``), and the same run in one process for the
test to compare.

The "none" objective (no latent noise, which is drawn per process) on answers of 1 to 6 words,
so the two processes' shares hold different numbers of answer tokens. Mode "vlm": a tiny
Qwen2-VL on examples of which half have no image, so a share can leave the vision tower
without gradients, its batches built in a DataLoader worker of each process. Mode "lora":
LoRA adapters on the text model's decoder and the latent tokens' rows (the base frozen), the
"amvl" objective with its noise fixed per example. Rank 0 writes the parameters to
OUT/params.safetensors. Mode "resume": see ``resumed_runs``; mode "signal":
``stopped_runs``.
"""

import contextlib
import json
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.model import AMVLModel
from amvl.tiny import tiny_image_processor, tiny_qwen2, tiny_qwen2_vl, word_tokenizer
from amvl.training import TrainConfig, train
from tests.worker_exit import exit_without_teardown

WORDS = [f"w{i}" for i in range(30)]
CONFIG = TrainConfig(steps=3, batch_size=4, learning_rate=5e-2, warmup_steps=0, log_every=1,
                     save_every=0, seed=2, ddp_timeout=1234)


def examples(vision: bool) -> list[dict]:
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        words = torch.randint(0, 30, (3 + i % 2,), generator=g).tolist()
        answer = torch.randint(0, 30, (1 + (5 * i) % 6,), generator=g).tolist()
        image = [Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8"))] \
            if vision and i % 2 else []
        out.append({"images": image, "question": " ".join(WORDS[w] for w in words),
                    "answer": " ".join(WORDS[w] for w in answer)})
    return out


def build(vision: bool, lora: bool = False) -> tuple[AMVLModel, AMVLCollator]:
    """The model (LoRA adapters on its text decoder and the latent tokens' rows with
    ``lora``, as amvl train adds them, under the "amvl" objective: train under
    :func:`noise_per_example`) and its collator."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS, vision=vision)
    base = tiny_qwen2_vl(tokenizer) if vision else tiny_qwen2(tokenizer)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4,
                                                  objective="amvl" if lora else "none",
                                                  kernel_backend="torch"))
    if lora:
        from amvl.lora import add_adapters

        add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None,
                             "train_latent_tokens": True})
    model = model.double()
    collator = AMVLCollator(tokenizer, tiny_image_processor() if vision else None,
                            VisionTokens.from_model_config(base.config) if vision else None)
    if vision:  # the image processor's fp32 pixels into a float64 model
        collator = _Float64Pixels(collator)
    return model, collator


class _Float64Pixels:
    """A collator whose pixel values come out in float64."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batch):
        out = self.collate(batch)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].double()
        return out


@contextlib.contextmanager
def noise_per_example() -> Iterator[None]:
    """Latent noise a fixed function of each example's prior mean, not of the process's
    seed: two processes then draw for their shares what one draws for the whole batch."""
    import amvl_kernels as ak

    sample_kl, sample = ak.gaussian_sample_kl, ak.gaussian_sample

    def eps_of(mu):
        return torch.sin(mu.detach() * 997.0 + 0.3)

    ak.gaussian_sample_kl = lambda mu_q, lv_q, mu_p, lv_p, eps=None, seed=None, **kw: \
        sample_kl(mu_q, lv_q, mu_p, lv_p, eps=eps_of(mu_p), **kw)
    ak.gaussian_sample = lambda mu, lv, eps=None, seed=None, **kw: \
        sample(mu, lv, eps=eps_of(mu), **kw)
    try:
        yield
    finally:
        ak.gaussian_sample_kl, ak.gaussian_sample = sample_kl, sample


def single_process(vision: bool, lora: bool = False) -> dict[str, torch.Tensor]:
    model, collator = build(vision, lora)
    with noise_per_example() if lora else contextlib.nullcontext():
        train(model, collator, examples(vision), CONFIG, progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def resumed_runs(out: str) -> None:
    """Mode "resume": 3 steps straight, and 1 step resumed to 3, with dropout in every
    attention layer (each process draws its own masks, for shares of other lengths). Rank 0
    writes both runs' parameters to OUT/<run>.safetensors."""
    config = TrainConfig(**{**CONFIG.__dict__, "save_every": 1, "lr_scheduler": "constant"})
    for run, stops in (("straight", [3]), ("resumed", [1, 3])):
        for i, steps in enumerate(stops):
            model, collator = build(False)
            for module in model.modules():
                if hasattr(module, "attention_dropout"):
                    module.attention_dropout = 0.3
            train(model, collator, examples(False),
                  TrainConfig(**{**config.__dict__, "steps": steps}),
                  output_dir=os.path.join(out, run), resume=i > 0, progress=False)
        if dist.get_rank() == 0:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                      os.path.join(out, f"{run}.safetensors"))


def stopped_runs(out: str) -> None:
    """Mode "signal": 4 steps straight, and a run whose rank 1 alone gets SIGUSR1 during its
    first step (at its log), resumed to 4. Each rank writes how its run stopped to
    OUT/stopped-<rank>.json; rank 0 writes both runs' parameters to OUT/<run>.safetensors."""
    import signal

    from amvl.stopping import TrainingStopped

    config = TrainConfig(**{**CONFIG.__dict__, "steps": 4})
    rank = int(os.environ["RANK"])  # the group starts in train

    def signal_rank_one(entry):
        if entry["step"] == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    for run in ("straight", "resumed"):
        model, collator = build(False)
        if run == "resumed":
            try:
                train(model, collator, examples(False), config,
                      output_dir=os.path.join(out, run), on_log=signal_rank_one, progress=False)
                raise SystemExit("the run went on after rank 1's signal")
            except TrainingStopped as stopped:
                with open(os.path.join(out, f"stopped-{rank}.json"), "w") as file:
                    json.dump({"step": stopped.step, "signal": stopped.signal_name,
                               "checkpoint": str(stopped.checkpoint)}, file)
            model, collator = build(False)
        train(model, collator, examples(False), config, output_dir=os.path.join(out, run),
              resume=run == "resumed", progress=False)
        if rank == 0:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                      os.path.join(out, f"{run}.safetensors"))


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    if mode in ("resume", "signal"):
        (resumed_runs if mode == "resume" else stopped_runs)(out)
        dist.barrier()
        dist.destroy_process_group()
        return
    vision = mode == "vlm"
    model, collator = build(vision, lora=mode == "lora")
    config = CONFIG
    if mode == "vlm":  # the images processed in a DataLoader worker of each process
        config = TrainConfig(**{**CONFIG.__dict__, "num_workers": 1})
    if mode == "accumulate":  # each process's share of 2 in micro-batches of 1
        config = TrainConfig(**{**CONFIG.__dict__, "micro_batch_size": 1})
    if mode == "compiled":  # TrainConfig.compile around the DDP wrapper
        config = TrainConfig(**{**CONFIG.__dict__, "compile": True})
        real_compile = torch.compile  # AOT eager: Inductor's compile would take minutes here
        torch.compile = lambda module: real_compile(module, backend="aot_eager")
    # "accumulate" validates too: each process a share of the examples, the sums added up
    held_out = examples(vision)[:5] if mode == "accumulate" else None
    with noise_per_example() if mode == "lora" else contextlib.nullcontext():
        history = train(model, collator, examples(vision), config, progress=False,
                        eval_examples=held_out)
    if mode == "compiled":
        from torch._dynamo.utils import counters

        if not counters["stats"]["unique_graphs"]:
            raise SystemExit("compile=True, but no graph was compiled")
    if dist.get_rank() == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  os.path.join(out, "params.safetensors"))
        with open(os.path.join(out, "history.json"), "w") as file:
            json.dump(history, file)
        # the timeout the loop's Accelerator gave the group it started (gloo's, on the CPU)
        gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        with open(os.path.join(out, "group.json"), "w") as file:
            json.dump({"timeout_s": gloo.options._timeout.total_seconds()}, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    exit_without_teardown()
