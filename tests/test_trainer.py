"""Trainer integration: single-process training, 2-process DDP, FSDP2 and DeepSpeed ZeRO
(gloo, CPU), PEFT LoRA, activation checkpointing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from amvl.checkpoints import merge_trainable_tokens
from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.lora import stored_layer
from amvl.model import AMVLModel, ensure_special_tokens
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.trainer import AMVLTrainer, StopOnSignals

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(30)]


def _tiny_model(amvl_attention: bool = False) -> tuple[AMVLModel, object]:
    """(model in training mode, tokenizer): a tiny Qwen2, on the "amvl" attention if asked."""
    import amvl_kernels.hf as akhf

    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    base = tiny_qwen2(tokenizer)
    model = AMVLModel(base, tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")).train()
    if amvl_attention:
        akhf.use_amvl_attention(base)
    return model, tokenizer


def _data(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
             "answer": WORDS[int(torch.randint(0, 30, (1,), generator=g))]} for _ in range(n)]


def test_trainer_trains_logs_and_saves(tmp_path):
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, logging_steps=2, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True,
                             per_device_eval_batch_size=4)
    trainer = AMVLTrainer(model, args, train_dataset=_data(), eval_dataset=_data(4),
                          data_collator=AMVLCollator(tokenizer))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "amvl/kl_rev" in e]
    assert len(logged) == 2 and all(e["amvl/nll"] > 0 for e in logged)
    assert not torch.equal(before["prior_head.proj.weight"], model.prior_head.proj.weight)
    assert trainer.evaluate()["eval_loss"] > 0
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AMVLModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(loaded.injector.proj.weight, model.injector.proj.weight)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_trainer_with_torch_compile_trains_like_eager(tmp_path, checkpointed):
    """TrainingArguments(torch_compile=True) on the "amvl" attention: the model's forward
    runs as compiled graphs without graph breaks (two: the one recompile when lengths first
    change), and the logged losses equal the eager Trainer's up to rounding; with
    gradient_checkpointing too."""
    from torch._dynamo.utils import counters

    fields = TrainingArguments.__dataclass_fields__  # renamed in transformers 5.24
    flag = "activation_checkpointing" if "activation_checkpointing" in fields \
        else "gradient_checkpointing"
    losses = {}
    for compiled in (False, True):
        model, tokenizer = _tiny_model(amvl_attention=True)
        torch._dynamo.reset()
        counters.clear()
        # AOT eager: Inductor's compile would take a minute on a CPU machine
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled \
            else {}
        args = TrainingArguments(output_dir=str(tmp_path / str(compiled)),
                                 per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                                 logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, **{flag: checkpointed},
                                 **extra)
        trainer = AMVLTrainer(model, args, train_dataset=_data(),
                              data_collator=AMVLCollator(tokenizer))
        trainer.train()
        losses[compiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert counters["stats"]["unique_graphs"] in (1, 2), dict(counters["stats"])
    assert not counters["graph_break"], list(counters["graph_break"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and len(losses[True]) == 4
    torch._dynamo.reset()


def test_cuda_graph_compile_modes_get_the_step_and_seed_as_tensors(tmp_path, monkeypatch):
    """Under torch_compile_mode "reduce-overhead" or "max-autotune" (CUDA graphs), the step
    and the noise seed reach the model as tensors, which a graph reads at each replay (a new
    int each step would be recorded anew each step), with the loss of the same ints; other
    modes pass ints. Checked on compute_loss, without compiling (the CPU has no CUDA graphs)."""
    from amvl_kernels.backends import triton_interpreted

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("a seed tensor needs the Triton kernels: a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="triton",
                                 kl_schedule="linear", kl_warmup_steps=8))
    batch = AMVLCollator(tokenizer)(_data(4))
    seen = []
    forward = AMVLModel.forward

    def spy(self, *args, **kwargs):
        seen.append((kwargs["step"], kwargs["seed"]))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(AMVLModel, "forward", spy)
    losses = {}
    for mode in ("default", "reduce-overhead", "max-autotune"):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 torch_compile_mode=mode, seed=3)
        trainer = AMVLTrainer(model, args, data_collator=AMVLCollator(tokenizer))
        trainer.state.global_step = 5
        losses[mode] = trainer.compute_loss(model, batch).item()
        step, seed = seen[-1]
        assert isinstance(step, torch.Tensor) == (mode != "default"), mode
        assert isinstance(seed, torch.Tensor) == (mode != "default"), mode
        assert int(step) == 5
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=1e-6)
    assert losses["max-autotune"] == pytest.approx(losses["default"], rel=1e-6)


@pytest.mark.parametrize("setting,match", [
    ({"compute_metrics": lambda p: {}}, "compute_metrics"),
    ({"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"train_sampling_strategy": "group_by_length"}, "precomputed 'length' column"),
    # looked for input_ids in the first evaluation
    ({"include_for_metrics": ["inputs"]}, "include_for_metrics"),
])
def test_trainer_refuses_what_amvl_batches_cannot_do(tmp_path, setting, match):
    """Settings the stock Trainer would skip without a word with AMVL batches (no logits,
    labels or input_ids), or crash on a step later, are refused when the trainer is built."""
    model, tokenizer = _tiny_model()
    trainer_kwargs = {k: v for k, v in setting.items() if k.startswith("compute")}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             **{k: v for k, v in setting.items() if k not in trainer_kwargs})
    with pytest.raises(ValueError, match=match):
        AMVLTrainer(model, args, train_dataset=_data(), eval_dataset=_data(4),
                    data_collator=AMVLCollator(tokenizer), **trainer_kwargs)


def test_trainer_leaves_the_callers_arguments_as_given(tmp_path):
    """remove_unused_columns must be off for raw AMVL examples: it was switched off on the
    caller's TrainingArguments, which a plain Trainer built beside it then inherited."""
    model, tokenizer = _tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = AMVLTrainer(model, args, data_collator=AMVLCollator(tokenizer))
    assert args.remove_unused_columns and not trainer.args.remove_unused_columns
    assert not AMVLTrainer(model, data_collator=AMVLCollator(tokenizer)).args.remove_unused_columns


@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_trainer_counts_the_tokens_it_trains_on(tmp_path, mode):
    """include_num_input_tokens_seen counts the prompts' and answers' tokens of every
    micro-batch (AMVL batches have no input_ids, where the stock count looks)."""
    model, tokenizer = _tiny_model()
    collator = AMVLCollator(tokenizer)
    seen = []

    def counting(examples):
        batch = collator(examples)
        seen.append(batch)
        return batch
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                             max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", include_num_input_tokens_seen=mode,
                             dataloader_num_workers=0)
    trainer = AMVLTrainer(model, args, train_dataset=_data(), data_collator=counting)
    trainer.train()
    trained = seen[:2]  # the loader may collate one batch ahead
    if mode == "all":
        expected = sum(b["prompt_ids"].numel() + b["answer_ids"].numel() for b in trained)
    else:
        expected = sum(int(b["prompt_mask"].sum() + b["answer_mask"].sum()) for b in trained)
    assert trainer.state.num_input_tokens_seen == expected > 0


def test_trainer_adds_neftune_noise_to_the_embeddings(tmp_path):
    """neftune_noise_alpha: the Trainer hooks the base model's input embeddings
    (AMVLModel.get_input_embeddings) for the run and removes the hook after it."""
    losses = []
    for alpha in (None, 5.0):
        model, tokenizer = _tiny_model()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                 max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="no", seed=0,
                                 neftune_noise_alpha=alpha)
        trainer = AMVLTrainer(model, args, train_dataset=_data(),
                              data_collator=AMVLCollator(tokenizer))
        trainer.train()
        losses.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
        assert not model.get_input_embeddings()._forward_hooks  # removed after training
    assert model.get_input_embeddings() is model.base.get_input_embeddings()
    assert losses[0][0] != losses[1][0] and all(x == x for x in losses[1])  # noised, finite


def test_gradient_accumulation_weighs_every_answer_token_alike(tmp_path):
    """Two micro-batches of 1 and 9 answer tokens in one optimizer step: the step follows the
    token mean over both, as one batch of the four examples would (the mean of the two
    micro-batches' token means counted a token of the short one 5x as much)."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch", objective="none")
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config).double()
    reference = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config).double()
    reference.load_state_dict(model.state_dict())
    data = [{"question": "w1 w2", "answer": "w3"}, {"question": "w4", "answer": "w5"},
            {"question": "w6 w7 w8", "answer": "w9 w10 w11 w12 w13"},
            {"question": "w14", "answer": "w15 w16 w17 w18 w19"}]
    collator = AMVLCollator(tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=1, learning_rate=0.5,
                             optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)

    class InOrder(AMVLTrainer):  # micro-batches of examples 0-1 and 2-3, as built above
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder(model, args, train_dataset=data, data_collator=collator).train()
    loss = reference(**collator(data)).loss
    loss.backward()
    with torch.no_grad():
        for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q, p - 0.5 * p.grad, rtol=1e-9, atol=1e-12,
                                           msg=name)


def _two_processes(worker: str, out: Path, *args: str) -> None:
    """tests/<worker> on 2 CPU processes under torchrun, with OUT and ``args``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--standalone", str(ROOT / "tests" / worker), str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_two_processes_keep_identical_parameters(tmp_path):
    _two_processes("ddp_worker.py", tmp_path)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs across ranks"
    torch.manual_seed(0)
    init = AMVLModel(tiny_qwen2(word_tokenizer(WORDS)), word_tokenizer(WORDS),
                     AMVLConfig(num_slots=2, latent_dim=4)).state_dict()
    assert not torch.equal(init["prior_head.proj.weight"], rank0["prior_head.proj.weight"])
    # the objective's metrics are logged as the loss is: averaged over the ranks, on each
    metrics = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert metrics[0]["logged"] == metrics[1]["logged"] and len(metrics[0]["logged"]) == 3
    for i, logged in enumerate(metrics[0]["logged"]):
        own = [m["own"][i] for m in metrics]
        assert own[0]["nll"] != own[1]["nll"]  # the ranks' batches differ
        for key, value in logged.items():
            assert value == pytest.approx((own[0][key] + own[1][key]) / 2, rel=1e-6), key
    # evaluation weighs examples as eval_loss does, without the copies that even out the
    # ranks' last batches (each rank's mean, copies included, was averaged over the ranks)
    evaluated = [{k: v for k, v in m["evaluated"].items() if "amvl" in k or k == "eval_loss"}
                 for m in metrics]
    assert evaluated[0] == evaluated[1] and len(evaluated[0]) > 4
    assert evaluated[0]["eval_amvl/loss"] == pytest.approx(evaluated[0]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("mode", ["paired", "checkpointed"])
def test_fsdp2_two_processes_train_like_one(tmp_path, monkeypatch, mode):
    """FSDP2 on 2 CPU processes, every linear pairing its weight gradients, or with
    accelerate's activation-checkpointing recipe: the prefix-shared step calls each sharded
    layer twice before one backward, and the gathered parameters after two steps equal one
    process's on both ranks' batches. Before and after the steps the ranks decode prompts
    whose rows end at different steps (synced decoding), and after them score with ``heads``,
    ``answer_nll`` and the multiple-choice scorers (choices numbering differently on the two
    ranks), as one process does; NaN logits on one rank make both refuse."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401 - skip where it is missing

    from amvl import weight_grads
    from tests import fsdp_worker

    _two_processes("fsdp_worker.py", tmp_path, mode)
    sharded = load_file(str(tmp_path / "fsdp.safetensors"))
    monkeypatch.setattr(weight_grads, "MIN_PAIRED_NUMEL", 0)
    model, collator = fsdp_worker.trained_in_one_process()
    expected = dict(model.named_parameters())
    assert sharded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(sharded[name], tensor.detach(), rtol=1e-10, atol=1e-12,
                                   msg=name)
    _check_decoding_on_both_ranks(tmp_path, model, collator)
    _check_decoding_on_both_ranks(tmp_path, *fsdp_worker.build(checkpointed=False),
                                  prefix="untrained_")
    for rank in (0, 1):  # rank 0's NaN logits: both refuse, neither waits for the other
        assert load_file(str(tmp_path / f"tokens{rank}.safetensors"))["refused"].item(), rank
        got = load_file(str(tmp_path / f"scores{rank}.safetensors"))
        expected = {**fsdp_worker.scores(model, collator, rank),
                    **fsdp_worker.choice_scores(model, collator, rank)}
        assert got.keys() == expected.keys()
        assert got.pop("refused").item() and not expected.pop("refused").item()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-10, atol=1e-12, msg=name)


def test_fsdp1_full_state_saves_and_loads_with_or_without_original_params(tmp_path):
    """FSDP1 without ``use_orig_params`` holds FlatParameters (``..._flat_param``) where the
    model's parameters were: save_pretrained of the gathered full state (what AMVLTrainer's
    _save does under FSDP) refused it as lacking every parameter. Both ways it saves, and
    the model loads back with the gathered weights."""
    _two_processes("fsdp_worker.py", tmp_path, "fsdp1_saves")
    for use_orig_params in (False, True):
        state = load_file(str(tmp_path / f"state_{use_orig_params}.safetensors"))
        loaded = AMVLModel.from_pretrained(tmp_path / f"uop_{use_orig_params}")
        params = dict(loaded.named_parameters())
        assert params.keys() <= state.keys()
        for name, tensor in params.items():
            assert torch.equal(tensor.detach(), state[name]), (use_orig_params, name)


def _check_decoding_on_both_ranks(out: Path, model: AMVLModel, collator: AMVLCollator,
                                  sharded: bool = True, prefix: str = "") -> None:
    """The ranks' tokens (a worker's ``fsdp_worker.decode``) are one process's: rank 0's rows
    ended after one token, then, on a ``sharded`` model, were padded while rank 1's ran on."""
    from tests import fsdp_worker

    pad = model.tokenizer.pad_token_id
    for rank in (0, 1):
        tokens = load_file(str(out / f"{prefix}tokens{rank}.safetensors"))["tokens"]
        expected = fsdp_worker.decode(model, collator, rank)
        assert expected.shape[-1] == (1 if rank == 0 else 4)
        assert tokens.shape[-1] == (4 if sharded else expected.shape[-1])
        assert torch.equal(tokens[..., :expected.shape[-1]], expected), (rank, tokens, expected)
        assert (tokens[..., expected.shape[-1]:] == pad).all()
    assert (tokens != pad).all()  # rank 1's


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (.ci/run installs it)")


@needs_deepspeed
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_deepspeed_two_processes_train_and_decode_like_one(tmp_path, monkeypatch, mode):
    """DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes: the gathered parameters after the
    prefix-shared steps of the FSDP test equal one process's (fp32), and decoding rows that
    end at different steps on the two ranks gives one process's tokens (ZeRO-2 keeps whole
    parameters on every rank: its ranks decode on their own)."""
    from amvl import weight_grads
    from tests import fsdp_worker

    _two_processes("deepspeed_worker.py", tmp_path, mode)
    params = load_file(str(tmp_path / "params.safetensors"))
    monkeypatch.setattr(weight_grads, "MIN_PAIRED_NUMEL", 0)
    model, collator = fsdp_worker.trained_in_one_process(torch.float32)
    expected = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(params[name], tensor.detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)
    _check_decoding_on_both_ranks(tmp_path, model, collator, sharded=mode == "zero3")
    untrained, collator = fsdp_worker.build(checkpointed=False, dtype=torch.float32)
    _check_decoding_on_both_ranks(tmp_path, untrained, collator, sharded=mode == "zero3",
                                  prefix="untrained_")


def _assert_same_tensors(got: dict, want: dict) -> None:
    """The same names, each tensor bitwise the same."""
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name].detach(), tensor), name


@needs_deepspeed
def test_deepspeed_zero3_trainer_saves_whole_weights(tmp_path):
    """AMVLTrainer with a ZeRO-3 config, on a base transformers built partitioned (AMVLModel
    writes its special tokens' embedding rows into partitioned matrices): the saved model
    loads with the weights the ranks hold between them."""
    _two_processes("deepspeed_worker.py", tmp_path, "trainer")
    params = load_file(str(tmp_path / "params.safetensors"))
    assert (tmp_path / "checkpoint-2" / "amvl_config.json").is_file()
    loaded = dict(AMVLModel.from_pretrained(tmp_path / "saved").named_parameters())
    _assert_same_tensors(loaded, params)


@needs_deepspeed
def test_deepspeed_zero3_trainer_without_gathering_weights_checkpoints_and_resumes(tmp_path):
    """ZeRO-3 without stage3_gather_16bit_weights_on_model_save (DeepSpeed's default): the
    stock save_model saves a stand-in empty state, which save_pretrained refused, killing the
    run at its first checkpoint. Now each checkpoint holds the heads (gathered from their
    partitions), the config and the tokenizer beside DeepSpeed's own checkpoint of the
    weights; a resume from it ends where the uninterrupted run ended; loading the weights
    from it is refused, saying how to recover them, and that recovery gives them back."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests import deepspeed_worker

    _two_processes("deepspeed_worker.py", tmp_path, "trainer_without_gathering")
    params = load_file(str(tmp_path / "params.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    _assert_same_tensors(resumed, params)
    for directory in (tmp_path / "params" / "checkpoint-2", tmp_path / "params" / "checkpoint-4",
                      tmp_path / "saved"):
        assert (directory / "amvl_config.json").is_file()
        assert (directory / "base" / "tokenizer_config.json").is_file()
        assert (directory / "base" / "config.json").is_file()
        assert not list((directory / "base").glob("*.safetensors"))
        assert list(directory.glob("global_step*")), directory
    heads = load_file(str(tmp_path / "saved" / "amvl_heads.safetensors"))
    assert heads.keys() == {k for k in params if k.split(".", 1)[0] in (
        "prior_head", "posterior_head", "injector", "slot_embeddings")}
    for name, tensor in heads.items():
        assert torch.equal(tensor, params[name]), name
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        AMVLModel.from_pretrained(tmp_path / "saved")
    model, _ = deepspeed_worker.zero3_built_model(partitioned=False)
    with pytest.raises(ValueError, match="get_fp32_state_dict_from_zero_checkpoint"):
        model.load_weights(tmp_path / "params" / "checkpoint-2")
    # the recovery the refusal describes
    model.save_pretrained(tmp_path / "recovered",
                          state_dict=get_fp32_state_dict_from_zero_checkpoint(tmp_path / "saved"))
    loaded = dict(AMVLModel.from_pretrained(tmp_path / "recovered").named_parameters())
    _assert_same_tensors(loaded, params)


@needs_deepspeed
def test_deepspeed_checkpoints_of_a_peft_base_leave_out_the_frozen_base(tmp_path):
    """A PEFT base under ZeRO-3 (LoRA, every parameter partitioned, no
    stage3_gather_16bit_weights_on_model_save): DeepSpeed's checkpoints hold
    only what trains, as the stock Trainer's do for PeftModels (the AMVLModel hid its
    PeftModel: they held the whole frozen base); a resume from one, which must not require
    the frozen weights, ends where the uninterrupted run ended; save_model gathers and saves
    the adapter and the heads alone (the flag's absence had saved DeepSpeed's whole
    checkpoint instead), and they load onto the plain base."""
    pytest.importorskip("peft")  # optional (the lora extra)
    from tests import deepspeed_worker

    _two_processes("deepspeed_worker.py", tmp_path, "peft_trainer_without_gathering")
    params = load_file(str(tmp_path / "params.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    _assert_same_tensors(resumed, params)
    model = deepspeed_worker.with_adapters(deepspeed_worker.zero3_built_model(False)[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable < params.keys() and any("lora_A" in n for n in trainable)
    for step in (2, 4):
        states = list((tmp_path / "params" / f"checkpoint-{step}" / f"global_step{step}")
                      .glob("*model_states.pt"))
        assert states
        for file in states:
            saved = torch.load(file, map_location="cpu", weights_only=False)["module"]
            assert saved.keys() and saved.keys() <= trainable, sorted(saved.keys() - trainable)
    assert (tmp_path / "saved" / "base" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "saved").glob("global_step*"))
    # the latent tokens' rows, which the adapter does not carry, gathered beside the heads
    rows = load_file(str(tmp_path / "saved" / "amvl_heads.safetensors"))
    ids = list(model.token_ids.values())
    for key, name in (("input", "embed_tokens"), ("output", "lm_head")):
        assert torch.equal(rows[f"special_tokens.{key}"], params[next(
            n for n in params if n.endswith(f"{name}.weight"))][ids]), key
    plain = deepspeed_worker.zero3_built_model(False)[0].base
    loaded = AMVLModel.from_pretrained(tmp_path / "saved", base_model=plain)
    for name, tensor in loaded.named_parameters():
        if name in trainable:
            assert torch.equal(tensor.detach(), params[name]), name


@needs_deepspeed
def test_deepspeed_zero3_vlm_with_text_only_batches_trains_like_one_process(tmp_path):
    """A tiny Qwen2-VL under ZeRO-3, rank 0's batches with images and rank 1's text-only: the
    collator's stand-in image keeps both ranks running the vision tower (whose gathers would
    otherwise leave rank 0 waiting), and the gathered parameters after the steps and each
    rank's decoded tokens equal one process's."""
    from amvl.training import step_seed
    from tests import deepspeed_worker, fsdp_worker

    _two_processes("deepspeed_worker.py", tmp_path, "vlm")
    params = load_file(str(tmp_path / "params.safetensors"))
    model, collator = deepspeed_worker.vlm()
    optimizer = torch.optim.SGD(model.parameters(), lr=fsdp_worker.LR)
    for step in range(fsdp_worker.STEPS):
        for rank in (0, 1):
            loss = model(**deepspeed_worker.vlm_batch(collator, step, rank), step=step,
                         seed=step_seed(0, step, rank)).loss
            (loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert params.keys() == dict(model.named_parameters()).keys()
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(params[name], tensor.detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)
    for rank in (0, 1):
        b = deepspeed_worker.vlm_batch(collator, 0, rank)
        assert "pixel_values" in b  # rank 1's from the stand-in
        expected = model.generate(b["prompt_ids"], b["prompt_mask"], b["pixel_values"],
                                  b["image_grid_thw"], max_new_tokens=3).sequences
        tokens = load_file(str(tmp_path / f"tokens{rank}.safetensors"))["tokens"]
        assert torch.equal(tokens[..., :expected.shape[-1]], expected), (rank, tokens, expected)


def test_peft_lora_on_the_base_model(tmp_path):
    pytest.importorskip("peft")  # optional (the lora extra)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    base = tiny_qwen2(tokenizer)
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")
    # Add the special tokens first so LoRA wraps the resized model.
    AMVLModel(base, tokenizer, config)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = AMVLModel(lora, tokenizer, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    batch = AMVLCollator(tokenizer)(_data(4))
    out = model(**batch, seed=1)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and "prior_head.proj.weight" in grads
    assert not any("base_layer" in n for n in grads)
    # Shared and naive paths agree through the adapters too.
    shared = model(**batch, seed=1, prefix_sharing=True).loss
    naive = model(**batch, seed=1, prefix_sharing=False).loss
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [{"target_modules": ["q_proj", "embed_tokens"]},
                                  {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
                         ids=["lora-embed-tokens", "save-lm-head"])
def test_peft_wrapped_embeddings_are_named_and_work_when_wrapped_after(lora):
    """PEFT on the embeddings or the LM head before the special tokens had rows: an
    AttributeError (num_embeddings) or transformers' TypeError deep in its resize. Now a
    ValueError saying how; built on the unwrapped base first, the wrapped model trains."""
    pytest.importorskip("peft")  # optional (the lora extra)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")
    with pytest.raises(ValueError, match="transformers cannot resize.*get_peft_model"):
        AMVLModel(get_peft_model(tiny_qwen2(tokenizer), LoraConfig(r=4, **lora)), tokenizer,
                  config)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config)
    model.base = get_peft_model(model.base, LoraConfig(r=4, **lora))
    rebuilt = AMVLModel(model.base, tokenizer, config)  # the rows exist: nothing to resize
    rebuilt(**AMVLCollator(tokenizer)(_data(3)), seed=1).loss.backward()
    grads = {n for n, p in rebuilt.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads)
    wrapped = "embed_tokens" if "embed_tokens" in lora["target_modules"] else "lm_head"
    assert any(wrapped in n for n in grads)


def test_activation_checkpointing_takes_the_naive_path_with_the_same_gradients():
    """On SDPA, checkpointed layers drop the KV cache that prefix sharing reuses: the step
    warns, runs the naive path, and gives the loss and gradients of the uncheckpointed shared
    step."""
    model, tokenizer = _tiny_model()
    batch = AMVLCollator(tokenizer)(_data(4))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch, seed=3, prefix_sharing=True).loss
    reference_grads = torch.autograd.grad(reference, params, allow_unused=True)
    model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing and model.is_gradient_checkpointing
    with pytest.warns(UserWarning, match="checkpointing drops the KV cache"):
        loss = model(**batch, seed=3, prefix_sharing=True).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params, allow_unused=True), reference_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # Without autograd too (older transformers drop the cache in training mode regardless).
    with torch.no_grad(), pytest.warns(UserWarning, match="checkpointing drops the KV cache"):
        again = model(**batch, seed=3, prefix_sharing=True).loss
    torch.testing.assert_close(again, reference)
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_activation_checkpointing_on_the_amvl_attention_keeps_prefix_sharing():
    """On the "amvl" attention x's keys live in PrefixKeys instead of the dropped cache: the
    checkpointed step stays prefix-shared (no fallback warning) and gives the uncheckpointed
    step's loss and gradients. A reentrant checkpoint, which would cut those gradients,
    raises."""
    import warnings

    model, tokenizer = _tiny_model(amvl_attention=True)
    batch = AMVLCollator(tokenizer)(_data(4))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch, seed=5, prefix_sharing=True).loss
    reference_grads = torch.autograd.grad(reference, params, allow_unused=True)
    model.gradient_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the naive path
        loss = model(**batch, seed=5, prefix_sharing=True).loss
    assert torch.equal(loss, reference)
    for g, r in zip(torch.autograd.grad(loss, params, allow_unused=True), reference_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant"):
        model(**batch, seed=5, prefix_sharing=True)


@pytest.mark.parametrize("amvl_attention", [False, True])
@pytest.mark.parametrize("how", ["checkpoint_wrapper", "composable"])
def test_fsdp_activation_checkpointing_is_recognised(monkeypatch, how, amvl_attention):
    """FSDP's activation checkpointing (accelerate, the Trainer's fsdp_config) wraps each
    decoder layer in torch's checkpoint_wrapper, without transformers' flag: the step kept
    the KV cache, which the backward's re-run appended to (a shape error), and with pairing
    the re-run saved other tensors (CheckpointError). It now counts as checkpointing: the
    uncheckpointed step's loss and gradients. The decoder layer classes are offered to FSDP's
    wrapping policy as a transformers model offers them."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from amvl import weight_grads

    monkeypatch.setattr(weight_grads, "MIN_PAIRED_NUMEL", 0)  # the tiny model's layers pair
    model, tokenizer = _tiny_model(amvl_attention)
    model.config.pair_weight_grads = True
    assert model._no_split_modules == ["Qwen2DecoderLayer"]
    batch = AMVLCollator(tokenizer)(_data(4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch, seed=5, prefix_sharing=True).loss
    reference_grads = dict(zip(names, torch.autograd.grad(reference, params)))
    layers = model.base.model.layers
    for i, layer in enumerate(layers):
        if how == "checkpoint_wrapper":
            layers[i] = checkpoint_wrapper(layer)
        else:
            checkpoint(layer)
    assert model.is_activation_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's fallback to the naive path, tested above
        loss = model(**batch, seed=5, prefix_sharing=True).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    names = [n.replace("._checkpoint_wrapped_module", "")
             for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    for name, g in zip(names, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(g, reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_with_activation_checkpointing(tmp_path):
    """TrainingArguments' checkpointing flag (renamed in transformers 5.24) reaches the base
    model through AMVLModel, and training runs."""
    model, tokenizer = _tiny_model()
    fields = TrainingArguments.__dataclass_fields__
    flag = "activation_checkpointing" if "activation_checkpointing" in fields \
        else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=2, learning_rate=1e-2, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, **{flag: True})
    trainer = AMVLTrainer(model, args, train_dataset=_data(8),
                          data_collator=AMVLCollator(tokenizer))
    with pytest.warns(UserWarning, match="checkpointing drops the KV cache"):
        trainer.train()
    assert model.is_activation_checkpointing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpointed_model_in_training_mode_runs_without_autograd():
    """An evaluation under no_grad of a checkpointed model left in training mode still runs
    the prefix-shared path on the "amvl" attention and gives the same loss."""
    model, tokenizer = _tiny_model(amvl_attention=True)
    batch = AMVLCollator(tokenizer)(_data(4))
    with torch.no_grad():
        reference = model(**batch, seed=7).loss
        model.gradient_checkpointing_enable()
        torch.testing.assert_close(model(**batch, seed=7).loss, reference)


def _trainer(model, tokenizer, out, steps: int, **kwargs) -> AMVLTrainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                             max_steps=steps, learning_rate=1e-2, save_steps=2,
                             save_strategy="steps", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant", **kwargs)
    return AMVLTrainer(model, args, train_dataset=_data(), data_collator=AMVLCollator(tokenizer))


def test_trainer_resumes_from_its_own_checkpoints(tmp_path):
    """``train(resume_from_checkpoint=...)`` loads what ``_save`` wrote (the stock Trainer
    looks for a model.safetensors there and gives up) and ends where an uninterrupted run
    ends (a constant learning rate: a schedule would end at step 2 in the cut run)."""
    model, tokenizer = _tiny_model()
    _trainer(model, tokenizer, tmp_path / "whole", 4).train()
    whole = {k: v.clone() for k, v in model.state_dict().items()}

    model, tokenizer = _tiny_model()
    _trainer(model, tokenizer, tmp_path / "cut", 2).train()
    at_two = {k: v.clone() for k, v in model.state_dict().items()}
    model, tokenizer = _tiny_model()  # fresh weights: the checkpoint must replace them all
    fresh = model.state_dict()["prior_head.proj.weight"].clone()
    trainer = _trainer(model, tokenizer, tmp_path / "cut", 4)
    trainer._load_from_checkpoint(str(tmp_path / "cut" / "checkpoint-2"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, at_two[name]), name
    assert not torch.equal(fresh, at_two["prior_head.proj.weight"])
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, whole[name], rtol=1e-5, atol=1e-6, msg=name)
    # the run's arguments beside each checkpoint, as JSON (the stock one pickles them)
    saved = json.loads((tmp_path / "cut" / "checkpoint-4" / "training_args.json").read_text())
    assert saved["max_steps"] == 4 and saved["learning_rate"] == 1e-2
    assert not (tmp_path / "cut" / "checkpoint-4" / "training_args.bin").exists()


def test_a_signal_saves_the_step_and_stops_the_trainer_and_its_resume_continues(tmp_path):
    """SIGTERM (a scheduler's) during step 3 saves checkpoint-3 (save_steps is 2) and raises
    TrainingStopped after the save; resume_from_checkpoint ends where an uninterrupted run
    ends. The handlers are put back, also after a run that raised."""
    import signal

    from transformers import TrainerCallback

    from amvl.stopping import TrainingStopped

    model, tokenizer = _tiny_model()
    _trainer(model, tokenizer, tmp_path / "whole", 5).train()
    whole = {k: v.clone() for k, v in model.state_dict().items()}

    class SignalAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    model, tokenizer = _tiny_model()
    trainer = _trainer(model, tokenizer, tmp_path / "cut", 5)
    trainer.add_callback(SignalAtThree)
    trainer.remove_callback(trainer._stop_on_signals)  # after the one that sends it
    trainer.add_callback(trainer._stop_on_signals)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 3") as raised:
        trainer.train()
    assert raised.value.checkpoint == tmp_path / "cut" / "checkpoint-3"
    assert (raised.value.checkpoint / "amvl_config.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before
    model, tokenizer = _tiny_model()
    trainer = _trainer(model, tokenizer, tmp_path / "cut", 5)
    trainer.train(resume_from_checkpoint=str(raised.value.checkpoint))
    assert trainer.state.global_step == 5
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert signal.getsignal(signal.SIGTERM) is before
    trainer = AMVLTrainer(model, TrainingArguments(str(tmp_path / "x"), use_cpu=True,
                                                   report_to=[]),
                          data_collator=AMVLCollator(tokenizer), stop_signals=())
    assert not any(isinstance(c, StopOnSignals) for c in trainer.callback_handler.callbacks)


def test_ddp_looks_for_unused_parameters_only_where_some_go_unused(tmp_path):
    """The stock Trainer had DDP walk the autograd graph for unused parameters at every step
    for any model that is not a PreTrainedModel; with a posterior on a text model every
    parameter gets a gradient. A setting of the caller's own is kept, and its arguments."""
    model, tokenizer = _tiny_model()
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    collator = AMVLCollator(tokenizer)
    trainer = AMVLTrainer(model, args, data_collator=collator)
    assert trainer.args.ddp_find_unused_parameters is False
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    assert args.ddp_find_unused_parameters is None and args.remove_unused_columns
    explicit = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[],
                                 ddp_find_unused_parameters=True)
    assert AMVLTrainer(model, explicit, data_collator=collator).args \
        .ddp_find_unused_parameters is True
    for objective in ("none", "prior"):  # the posterior's head (and the prior's) unused
        torch.manual_seed(0)
        other = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                          AMVLConfig(num_slots=2, latent_dim=4, objective=objective))
        assert AMVLTrainer(other, args, data_collator=collator).args \
            .ddp_find_unused_parameters is True


def test_settings_that_fail_late_on_several_devices_are_refused(tmp_path):
    """Reentrant activation checkpointing on several processes failed at the first backward
    ("Expected to mark a variable ready only once"); several GPUs in one process
    (DataParallel) could not gather the outputs."""
    import dataclasses

    model, tokenizer = _tiny_model()
    collator = AMVLCollator(tokenizer)

    @dataclasses.dataclass
    class TwoProcesses(TrainingArguments):
        @property
        def world_size(self):
            return 2

    @dataclasses.dataclass
    class TwoGPUs(TrainingArguments):
        @property
        def n_gpu(self):
            return 2

    reentrant = {"gradient_checkpointing": True,
                 "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    with pytest.raises(ValueError, match=r"reentrant activation checkpointing .* on 2 "
                                         "processes"):
        AMVLTrainer(model, TwoProcesses(str(tmp_path), use_cpu=True, report_to=[],
                                        **reentrant), data_collator=collator)
    AMVLTrainer(model, TrainingArguments(str(tmp_path), use_cpu=True, report_to=[],
                                         **reentrant), data_collator=collator)  # one: fine
    with pytest.raises(ValueError, match="2 GPUs in one process"):
        AMVLTrainer(model, TwoGPUs(str(tmp_path), use_cpu=True, report_to=[]),
                    data_collator=collator)


def test_peft_model_saves_and_loads_its_special_token_rows(tmp_path):
    """A PEFT base saves only its adapter; the latent special tokens' embedding rows, which
    the resize created and the adapter does not carry, travel beside the heads."""
    pytest.importorskip("peft")  # optional (the lora extra)
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")
    base = tiny_qwen2(tokenizer)
    AMVLModel(base, tokenizer, config)
    model = AMVLModel(get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])),
                      tokenizer, config)
    ids = list(model.token_ids.values())
    with torch.no_grad():  # what training moves: the adapter, the heads and the new rows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
            layer.weight[ids] += torch.randn_like(layer.weight[ids])
    batch = AMVLCollator(tokenizer)(_data(4))
    expected = model(**batch, seed=1).loss
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_text("")  # an earlier whole-model save
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "base" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="PEFT adapter"):
        AMVLModel.from_pretrained(tmp_path)
    for wrap in (True, False):  # the adapter loaded onto the base by PEFT, or by us
        torch.manual_seed(0)  # the pretrained base again, whose matrix lacks the tokens' rows
        fresh = tiny_qwen2(word_tokenizer(WORDS))
        loaded = AMVLModel.from_pretrained(tmp_path, base_model=PeftModel.from_pretrained(
            fresh, tmp_path / "base") if wrap else fresh)
        torch.testing.assert_close(loaded(**batch, seed=1).loss, expected)
        torch.testing.assert_close(loaded._unwrapped().get_input_embeddings().weight[ids],
                                   model._unwrapped().get_input_embeddings().weight[ids])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_trainable_tokens_train_the_latent_rows_and_save_and_load(tmp_path, monkeypatch,
                                                                      tied):
    """PEFT's trainable tokens on the latent tokens' rows (``trainable_token_indices``, as amvl
    train's LoRA puts them): they train, and the model saves and loads them. Their wrapper's
    ``weight`` is a copy of the whole matrix with the trained rows put in, built at every read:
    ``model.device`` read it (1.1 GB copied on Qwen2-7B at every read), and loading wrote the
    saved rows into such a copy, where they were lost."""
    pytest.importorskip("peft")  # optional (the lora extra)
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from amvl.lora import latent_row_ids

    def base_model():
        torch.manual_seed(0)
        base = tiny_qwen2(word_tokenizer(WORDS))
        if tied:
            base.config.tie_word_embeddings = True
            base.tie_weights()
        return base

    tokenizer = word_tokenizer(WORDS)
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")
    model = AMVLModel(base_model(), tokenizer, config)
    rows = latent_row_ids(model)
    assert len(rows) == 4  # the bounds and both query slots (the "amvl" objective)
    model.base = get_peft_model(model.base, LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices=rows))
    built = []
    merged = TrainableTokensLayer.get_merged_weights
    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights",
                        lambda self, *args: built.append(self) or merged(self, *args))
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert not built
    model.train()
    batch = AMVLCollator(tokenizer)(_data(4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model.get_input_embeddings().weight.detach().clone()
    for _ in range(2):
        built.clear()
        model(**batch, seed=1).loss.backward()
        # the lookup of the step's tokens (and the tied LM head's logits), nothing else
        assert len(built) == (2 if tied else 1)
        optimizer.step()
        optimizer.zero_grad()
    after = model.get_input_embeddings().weight.detach()
    moved = (after != before).any(-1).nonzero().flatten().tolist()
    assert moved == rows  # the placeholder's row is never read: it stays
    model.eval()
    expected = model(**batch, seed=1).loss
    model.save_pretrained(tmp_path)
    fresh = base_model()  # the pretrained base: ensure its rows, wrap it, load
    ensure_special_tokens(fresh, tokenizer, config)
    loaded = AMVLModel.from_pretrained(tmp_path, base_model=PeftModel.from_pretrained(
        fresh, tmp_path / "base"), tokenizer=tokenizer)
    torch.testing.assert_close(loaded(**batch, seed=1).loss, expected)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, after)
    # the stored matrix holds the trained rows too (from the heads' file)
    torch.testing.assert_close(stored_layer(loaded.get_input_embeddings()).weight[rows],
                               after[rows])
    # Saved from a gathered state (FSDP, ZeRO-3: the live matrices may be shards): the
    # state's stored rows, which the adapter's trained ones override on load. The wrapper's
    # merged copy is no parameter, so the live one was read, which PEFT cannot build from a
    # ZeRO-3 partition.
    matrix = stored_layer(model.get_input_embeddings()).weight
    state = {name: tensor.detach() + (1.0 if tensor is matrix else 0.0)  # (tied: both names)
             for name, tensor in model.named_parameters(remove_duplicate=False)}
    ids = list(model.token_ids.values())
    saved = model._special_token_rows(state)
    torch.testing.assert_close(saved["special_tokens.input"], matrix[ids] + 1.0)
    assert ("special_tokens.output" in saved) != tied
    # merged for inference (amvl eval, generate): the same loss, no copy built
    unmerged = loaded(**batch, seed=1).loss
    merge_trainable_tokens(loaded)
    built.clear()
    assert torch.equal(loaded(**batch, seed=1).loss, unmerged) and not built


def _record_calls(model) -> list[dict]:
    """The step and seed of every forward of ``model``."""
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: kwargs.get(k) for k in ("step", "seed")}),
        with_kwargs=True)
    return calls


def test_each_rank_and_micro_batch_draws_its_own_noise(tmp_path, monkeypatch):
    """With one TrainingArguments.seed on every rank (as a Trainer script has it), the latent
    noise still differs between ranks and between micro-batches, and is the same again for
    the same rank: seeded from (seed, micro-batch, rank), not torch's global generator, which
    the Trainer seeds alike on every rank."""
    seeds = {}
    for rank in (0, 1, 0):
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: rank))
        model, tokenizer = _tiny_model()
        calls = _record_calls(model)
        _trainer(model, tokenizer, tmp_path / f"rank{rank}", 2,
                 gradient_accumulation_steps=2).train()
        run = [c["seed"] for c in calls]
        # 2 steps of up to 2 micro-batches (an epoch of 3 batches ends the second early)
        assert len(run) == len(set(run)) >= 3 and None not in run
        assert seeds.setdefault(rank, run) == run
    assert not set(seeds[0]) & set(seeds[1])


def test_evaluation_scores_the_full_objective_with_fixed_noise(tmp_path):
    """eval_loss is the full objective (KL weight 1 during a warm-up), the same for the same
    model every time, and evaluating between steps leaves training's losses as they were."""
    histories = []
    for eval_steps in (None, 1):
        model, tokenizer = _tiny_model()
        model.config.kl_schedule, model.config.kl_warmup_steps = "linear", 100
        calls = _record_calls(model)
        extra = dict(eval_strategy="steps", eval_steps=eval_steps) if eval_steps else {}
        trainer = AMVLTrainer(model, TrainingArguments(
            output_dir=str(tmp_path / str(eval_steps)), per_device_train_batch_size=4,
            per_device_eval_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            **extra), train_dataset=_data(), eval_dataset=_data(8),
            data_collator=AMVLCollator(tokenizer))
        trainer.train()
        histories.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
        if eval_steps:
            first, again = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
            assert first == again
            # 2 batches an evaluation: 3 during training, 2 after, all at KL weight 1
            assert sum(c["step"] is None for c in calls) == 3 * 2 + 2 * 2
    assert histories[0] == histories[1]


def test_evaluation_reports_the_objectives_metrics(tmp_path):
    """evaluate() and predict() logged eval_loss alone: the NLL and KLs that training logs
    (amvl/...) were not there to watch on held-out data. Averaged over the examples as
    eval_loss is, and the same model's full objective as a forward with the same noise."""
    model, tokenizer = _tiny_model()
    trainer = AMVLTrainer(model, TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
        disable_tqdm=True), data_collator=AMVLCollator(tokenizer))
    data = _data(7)  # batches of 3, 3 and 1: a plain mean of batches would differ
    metrics = trainer.evaluate(data)
    for key in ("nll", "kl_fwd", "kl_rev", "active_slots", "loss"):
        assert f"eval_amvl/{key}" in metrics, sorted(metrics)
    assert metrics["eval_amvl/loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert not any("/slot" in key for key in metrics)
    predicted = trainer.predict(data).metrics
    assert predicted["test_amvl/nll"] == metrics["eval_amvl/nll"]
    trainer.model.eval()  # a direct call outside an evaluation adds to no sums
    trainer.compute_loss(trainer.model, AMVLCollator(tokenizer)(data[:2]))
    assert trainer.evaluate(data)["eval_amvl/nll"] == metrics["eval_amvl/nll"]


def test_evaluation_reports_the_nll_from_the_priors_means(tmp_path):
    """Trainer evaluation lacked what amvl.validation reports beside the objective: the
    answers' NLL decoded from the prior's means, as inference decodes, whose gap to the
    posterior's NLL is the leakage AMVL limits. Each batch's token mean, averaged over the
    examples as eval_loss is; gamma's prior-draw NLL is nll_prior_draw, as in validation."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch", gamma=0.5))
    g = torch.Generator().manual_seed(4)
    data = [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
             "answer": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (1 + n % 4,),
                                                                     generator=g))}
            for n in range(7)]
    collator = AMVLCollator(tokenizer)
    trainer = AMVLTrainer(model, TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
        disable_tqdm=True), data_collator=collator)
    metrics = trainer.evaluate(data)
    want = 0.0
    with torch.no_grad():
        for start in range(0, 7, 3):  # batches of 3, 3 and 1
            batch = collator(data[start:start + 3])
            z = model.heads(batch["prompt_ids"], batch["prompt_mask"])["mu_p"]
            per_example = model.answer_nll(batch["prompt_ids"], batch["prompt_mask"],
                                           batch["answer_ids"], batch["answer_mask"], z=z)
            tokens = batch["answer_mask"].sum(1)
            want += float((per_example * tokens).sum() / tokens.sum()) * len(tokens) / 7
    assert metrics["eval_amvl/nll_prior"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_amvl/nll_prior_draw"] != metrics["eval_amvl/nll_prior"]  # a draw
    with pytest.raises(ValueError, match="prior_mean_nll is an evaluation metric"):
        model(**collator(data[:2]), prior_mean_nll=True)


def test_a_tokenizer_as_processing_class(tmp_path):
    """processing_class=tokenizer, the stock Trainer usage, crashed train(): transformers
    aligned the special tokens of model.config, an AMVLConfig here. The base model's config
    is aligned instead, and the tokenizer is the trainer's again afterwards."""
    model, tokenizer = _tiny_model()
    model.base.config.pad_token_id = None
    trainer = AMVLTrainer(model, TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no"), train_dataset=_data(),
        data_collator=AMVLCollator(tokenizer), processing_class=tokenizer)
    trainer.train()
    assert trainer.processing_class is tokenizer
    assert model.base.config.pad_token_id == tokenizer.pad_token_id


def test_predict_draws_the_noise_evaluate_draws(tmp_path):
    """predict() skipped evaluate()'s reset of the noise counter: two predictions of one
    model differed, and neither equalled eval_loss."""
    model, tokenizer = _tiny_model()
    trainer = AMVLTrainer(model, TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
        disable_tqdm=True), data_collator=AMVLCollator(tokenizer))
    data = _data(8)
    predicted = [trainer.predict(data).metrics["test_loss"] for _ in range(2)]
    assert predicted[0] == predicted[1] == trainer.evaluate(data)["eval_loss"]


def test_a_second_train_call_starts_its_counts_afresh(tmp_path):
    """A resume on the same trainer object (a notebook after an interruption) continued the
    first call's noise counters and logged its unlogged metrics: it must match a fresh run."""
    def run(cut: bool) -> tuple[list[dict], dict[str, torch.Tensor], list[float]]:
        model, tokenizer = _tiny_model()
        calls = _record_calls(model)
        trainer = _trainer(model, tokenizer, tmp_path / f"cut{cut}", 4, logging_steps=2,
                           gradient_accumulation_steps=2)
        if cut:  # stop in the middle of step 3, after the step-2 checkpoint
            real, seen = trainer.compute_loss, []

            def interrupted(*args, **kwargs):
                seen.append(1)
                if len(seen) == 5:
                    raise KeyboardInterrupt
                return real(*args, **kwargs)
            trainer.compute_loss = interrupted
            with pytest.raises(KeyboardInterrupt):
                trainer.train()
            trainer.compute_loss = real
            del calls[:]
            trainer.train(resume_from_checkpoint=True)
        else:
            trainer.train()
        logged = [e["amvl/loss"] for e in trainer.state.log_history if "amvl/loss" in e]
        return [c for c in calls if c["step"] >= 2], model.state_dict(), logged

    whole_calls, whole_state, whole_log = run(False)
    cut_calls, cut_state, cut_log = run(True)
    assert cut_calls == whole_calls
    assert cut_log[-1] == whole_log[-1]
    for name, tensor in whole_state.items():
        assert torch.equal(cut_state[name], tensor), name


def test_a_retry_at_a_smaller_batch_starts_its_counts_afresh(tmp_path):
    """auto_find_batch_size re-enters the training loop at a smaller batch without train():
    the failed step's seed and metrics carried over, so two steps drew the same noise and the
    first line's amvl/loss was not its loss. The retry now runs as a fresh run at its size."""
    def run(batch_size: int, fail_once: bool) -> tuple[list[dict], list[tuple[float, float]]]:
        model, tokenizer = _tiny_model()
        calls = _record_calls(model)
        trainer = AMVLTrainer(model, TrainingArguments(
            output_dir=str(tmp_path / str(fail_once)), per_device_train_batch_size=batch_size,
            auto_find_batch_size=fail_once, max_steps=2, logging_steps=1, learning_rate=1e-2,
            report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0),
            train_dataset=_data(), data_collator=AMVLCollator(tokenizer))
        if fail_once:
            backward, failures = trainer.accelerator.backward, []

            def out_of_memory_once(loss, **kwargs):
                if not failures:
                    failures.append(1)
                    raise RuntimeError("CUDA out of memory. (simulated)")
                return backward(loss, **kwargs)
            trainer.accelerator.backward = out_of_memory_once
        trainer.train()
        logged = [(e["loss"], e["amvl/loss"]) for e in trainer.state.log_history if "loss" in e]
        return calls[1:] if fail_once else calls, logged

    retried_calls, retried_log = run(4, True)  # retried at 3 (the finder's 0.9, rounded down)
    fresh_calls, fresh_log = run(3, False)
    assert retried_calls == fresh_calls and len({c["seed"] for c in fresh_calls}) == 2
    assert retried_log == pytest.approx(fresh_log, rel=1e-6)
    assert all(loss == pytest.approx(metric, rel=1e-5) for loss, metric in retried_log)


def test_a_processing_class_that_is_not_a_tokenizer_and_a_missing_collator(tmp_path):
    """An image processor as processing_class crashed train() (its special tokens were
    aligned as a tokenizer's) and was not saved; a trainer without a data_collator failed
    inside the Trainer with a TypeError about joining None."""
    from amvl.checkpoints import load_image_processor
    from amvl.tiny import tiny_image_processor

    model, tokenizer = _tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    processor = tiny_image_processor()
    trainer = AMVLTrainer(model, args, train_dataset=_data(),
                          data_collator=AMVLCollator(tokenizer), processing_class=processor)
    trainer.train()
    assert trainer.processing_class is processor and trainer.state.global_step == 1
    trainer.save_model(str(tmp_path / "saved"))  # beside the base, where amvl eval finds it
    assert load_image_processor(tmp_path / "saved" / "base").to_dict() == processor.to_dict()
    for given in ({}, {"processing_class": tokenizer}):  # DataCollatorWithPadding with one
        with pytest.raises(ValueError, match="data_collator=amvl.data.AMVLCollator"):
            AMVLTrainer(model, args, train_dataset=_data(), **given)


def test_logged_metrics_weigh_steps_as_the_trainer_weighs_its_loss(tmp_path):
    """An epoch ending in a shorter accumulation step: amvl/* averaged micro-batches where
    the Trainer's loss averages optimizer steps, and the two disagreed on one log line."""
    model, tokenizer = _tiny_model()
    # 12 examples in batches of 2 with 4 micro-batches a step: steps of 4 and 2 micro-batches
    trainer = AMVLTrainer(model, TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        num_train_epochs=1, logging_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no"), train_dataset=_data(12),
        data_collator=AMVLCollator(tokenizer))
    trainer.train()
    line, = [e for e in trainer.state.log_history if "amvl/loss" in e]
    assert line["amvl/loss"] == pytest.approx(line["loss"], rel=1e-5)


def test_a_used_image_cache_does_not_stop_pickling():
    """DataLoader workers started by spawn or forkserver pickle the collator; a cache of weak
    references made that fail once the collator had run."""
    import pickle

    import numpy as np
    from PIL import Image

    from amvl.data import VisionTokens
    from amvl.tiny import tiny_image_processor

    tokenizer = word_tokenizer(WORDS, vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    collator = AMVLCollator(tokenizer, tiny_image_processor(), vision, cache_images=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    example = {"question": "w1", "answer": "w2", "images": [image]}
    batch = collator([example])
    copy = pickle.loads(pickle.dumps(collator))
    assert copy._image_cache == {} and collator._image_cache
    torch.testing.assert_close(copy([example])["pixel_values"], batch["pixel_values"])
