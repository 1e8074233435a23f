"""The training loop: data order, atomic checkpoints, exact resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.step_batches import batch_indices
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.training import TrainConfig, latest_checkpoint, train

WORDS = [f"w{i}" for i in range(30)]


def _data(n: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
             "answer": WORDS[int(torch.randint(0, 30, (1,), generator=g))]} for _ in range(n)]


def _model() -> tuple[AMVLModel, AMVLCollator]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch",
                                 kl_schedule="linear", kl_warmup_steps=4))
    return model, AMVLCollator(tokenizer)


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, bs = 10, 4
    first_epochs = sum((batch_indices(n, bs, s, seed=3) for s in range(5)), [])
    assert sorted(first_epochs) == sorted(list(range(n)) * 2)
    assert batch_indices(n, bs, 7, seed=3) == batch_indices(n, bs, 7, seed=3)
    assert batch_indices(n, bs, 0, seed=3) != batch_indices(n, bs, 0, seed=4)


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=6, batch_size=4, learning_rate=5e-3, warmup_steps=2,
                         log_every=2, save_every=3, seed=1)
    straight, collator = _model()
    history = train(straight, collator, _data(), config, progress=False)

    interrupted, collator = _model()

    # Stop after the step-3 checkpoint by raising from the logging hook at step 4.
    class Stop(Exception):
        pass

    def stop_at_four(entry):
        if entry["step"] >= 4:
            raise Stop

    try:
        train(interrupted, collator, _data(), config, output_dir=tmp_path,
              on_log=stop_at_four, progress=False)
    except Stop:
        pass
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary dir left"
    logged = tmp_path / "history.jsonl"  # the history outlives pruned checkpoints
    assert [json.loads(line)["step"] for line in logged.read_text().splitlines()] == [2, 4]

    resumed, collator = _model()  # fresh weights, fresh optimizer: all must come from disk
    resumed_history = train(resumed, collator, _data(), config, output_dir=tmp_path,
                            resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [e["step"] for e in resumed_history] == [2, 4, 6]
    for a, b in zip(history, resumed_history):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), key
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    # rewritten from the checkpoint's history: step 4 of the lost run is gone, not doubled
    assert [json.loads(line) for line in logged.read_text().splitlines()] == resumed_history


def test_low_precision_weights_are_warned_about():
    """bf16 weights under AdamW without fp32 master weights lose updates below their rounding
    step: the shipped config loaded bf16 weights at lr 1e-5 and its decoder barely moved."""
    model, collator = _model()
    model.base.to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"\d+% of the trainable weights are bfloat16"):
        train(model, collator, _data(), TrainConfig(steps=1, batch_size=2, log_every=1),
              progress=False)
    model, collator = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(model, collator, _data(), TrainConfig(steps=4, batch_size=2, log_every=1),
              progress=False)


def test_a_batch_larger_than_the_data_is_named():
    """Every batch then repeats examples: it was silent."""
    model, collator = _model()
    with pytest.warns(UserWarning, match="batch_size 16 is larger than the 3 examples"):
        train(model, collator, _data()[:3], TrainConfig(steps=4, batch_size=16, log_every=1),
              progress=False)


def test_a_warm_up_longer_than_the_run_is_named():
    model, collator = _model()
    model.config.kl_schedule, model.config.kl_warmup_steps = "linear", 10
    with pytest.warns(UserWarning, match="kl_warmup_steps=10 is longer than the run's 2 steps"):
        train(model, collator, _data(), TrainConfig(steps=2, batch_size=2, log_every=1),
              progress=False)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    for kwargs, match in [({"warmup_steps": 11, "steps": 10}, "warmup_steps"),
                          ({"save_every": -1}, "save_every"), ({"seed": -1}, "seed"),
                          ({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler"),
                          ({"mixed_precision": "fp8"}, "mixed_precision")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="compile must be true or false"):
        TrainConfig(compile="yes")  # a string in a config file would read as true
    model, collator = _model()
    with pytest.raises(ValueError, match="at least one example"):
        train(model, collator, [], TrainConfig(steps=1), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(model, collator, _data(), TrainConfig(steps=1), output_dir="/nonexistent/x",
              resume=True, progress=False)


def test_activation_checkpointing_trains_the_same_steps():
    """With activation checkpointing the loop runs the naive path: the same history as the
    prefix-shared loop without it, up to rounding."""
    config = TrainConfig(steps=3, batch_size=4, learning_rate=5e-3, log_every=1, seed=2)
    plain, collator = _model()
    expected = train(plain, collator, _data(), config, progress=False)
    checkpointed, collator = _model()
    with pytest.warns(UserWarning, match="checkpointing drops the KV cache"):
        history = train(checkpointed, collator, _data(),
                        TrainConfig(**{**config.__dict__, "activation_checkpointing": True}),
                        progress=False)
    assert checkpointed.is_activation_checkpointing
    for got, want in zip(history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


@pytest.mark.parametrize("checkpointed,lora", [(False, False), (True, False), (False, True)],
                         ids=["plain", "checkpointed", "lora"])
def test_compiled_loop_trains_the_same_steps_on_the_amvl_attention(monkeypatch, checkpointed,
                                                                   lora):
    """TrainConfig(compile=True): each step's forward runs as a torch.compile graph (a
    counting backend sees it; one recompile when the step, the seed and the lengths first
    change, then none) and the history equals the eager loop's, up to rounding. With
    activation checkpointing too, without a graph break: PrefixKeys' records inside the
    checkpointed layers broke the graph at each of them. With LoRA as amvl train adds it
    (adapters, and the latent tokens' rows under PEFT's trainable tokens) too."""
    import amvl_kernels.hf as akhf

    if lora:
        pytest.importorskip("peft")
    from amvl.lora import add_adapters

    def model():
        built, collator = _model()
        akhf.use_amvl_attention(built.base)
        if lora:
            add_adapters(built, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None,
                                 "train_latent_tokens": True})
        return built, collator

    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")  # Inductor's compile would take a minute
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=counter))
    config = TrainConfig(steps=5, batch_size=4, learning_rate=5e-3, log_every=1, seed=2,
                         activation_checkpointing=checkpointed)
    eager, collator = model()
    expected = train(eager, collator, _data(), config, progress=False)
    compiled, collator = model()
    history = train(compiled, collator, _data(), TrainConfig(**{**config.__dict__,
                                                                 "compile": True}),
                    progress=False)
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    assert not counters["graph_break"], list(counters["graph_break"])
    for got, want in zip(history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    torch._dynamo.reset()


def test_the_loop_never_reads_metrics_each_step_and_logs_the_rate_it_used(monkeypatch):
    """Metrics stay on the device until a log line (a read each step would make the host wait
    for the GPU before it queues the next step), and each line's learning rate is the one
    its last step used."""
    from amvl.objectives import Metrics

    def refuse(self):
        raise AssertionError("metrics read to the host inside the loop")
    monkeypatch.setattr(Metrics, "_read", refuse)
    model, collator = _model()
    config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=2,
                         lr_scheduler="linear", log_every=1)
    history = train(model, collator, _data(), config, progress=False)
    # linear warm-up over 2 steps, then down to 0 at step 4: the rates steps 0..3 used
    assert [e["lr"] for e in history] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_every_step_trains_in_train_mode_whatever_on_log_did():
    """An on_log callback that evaluates the model (diagnostics, generation) may leave it in
    eval mode; the next step must still train in train mode (dropout, checkpointing)."""
    model, collator = _model()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    train(model, collator, _data(), TrainConfig(steps=3, batch_size=2, log_every=1),
          on_log=lambda entry: model.eval(), progress=False)
    assert modes == [True, True, True]


def test_weight_decay_spares_biases_and_norms():
    """As transformers' Trainer does: AdamW decays the weight matrices, not the biases and
    normalisation gains (a decayed RMSNorm gain drifts towards 0, not 1); a tied weight is
    listed once."""
    from amvl.training import _decay_groups

    model, _ = _model()
    decay, keep = _decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert kept and all("norm" in n or n.endswith("bias") for n in kept)
    assert all(p.dim() == 2 for p in decay["params"])
    listed = decay["params"] + keep["params"]
    assert len({id(p) for p in listed}) == len(listed) == \
        len({id(p) for p in model.parameters() if p.requires_grad})


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": "1e-5"}, "YAML reads 1e-5 as a string"),
    ({"steps": 3.5}, "steps must be an int"),
    ({"activation_checkpointing": "false"}, "activation_checkpointing"),
    ({"max_grad_norm": "1.0"}, "max_grad_norm"),
    ({"weight_decay": -0.1}, "weight_decay"),
    # turned clipping off without a word, as 0 does
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be >= 0 \(0: no clipping\), got -1.0"),
    ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
    ({"num_workers": True}, "num_workers must be an int"),
])
def test_train_config_types_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_step_seeds_never_collide():
    from amvl.training import step_seed

    seeds = {step_seed(s, step, rank) for s in range(3) for step in range(50)
             for rank in range(8)}
    assert len(seeds) == 3 * 50 * 8 and all(0 <= x < 2**63 for x in seeds)
    # the model draws the prior path's noise from seed + 1: never another step's seed
    assert not {x + 1 for x in seeds} & seeds


def test_saves_keep_the_loss_scale_and_drop_killed_saves(tmp_path):
    """fp16's loss scale is saved with the checkpoint (a resumed run continues from it), and
    temporary directories of saves killed before their rename are removed."""
    from amvl.training import _prune, save_checkpoint

    model, _ = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    (tmp_path / ".checkpoint-3.abc123").mkdir()
    path = save_checkpoint(tmp_path, 4, model, optimizer, scheduler, [], TrainConfig(),
                           scaler=scaler)
    assert torch.load(path / "scaler.pt", weights_only=True)["scale"] == 2.0**10
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_fsdp_and_deepspeed_are_sent_to_the_trainer():
    """This loop checkpoints from one full copy of the model: refused under FSDP and ZeRO,
    whose processes hold shards, instead of writing partial checkpoints."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    model, collator = _model()
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        fake = SimpleNamespace(distributed_type=kind, native_amp=True, num_processes=2,
                               process_index=0)
        with pytest.raises(ValueError, match="AMVLTrainer"):
            train(model, collator, _data(), TrainConfig(steps=1), accelerator=fake,
                  progress=False)


def test_a_run_that_logged_its_last_step_resumes_with_the_right_means(tmp_path):
    """A run of 4 steps logs step 4 and closes its window; resumed to 8 with log_every=3,
    the window of steps 5-6 was divided by 3 (the window's length, not the steps in it)."""
    import dataclasses

    config = TrainConfig(steps=8, batch_size=4, learning_rate=5e-3, log_every=3, seed=1,
                         lr_scheduler="constant")  # the same rates in the runs of 4 and 8
    straight, collator = _model()
    whole = {e["step"]: e["loss"] for e in train(straight, collator, _data(), config,
                                                  progress=False)}
    model, collator = _model()
    first = {e["step"]: e["loss"] for e in train(
        model, collator, _data(), dataclasses.replace(config, steps=4), output_dir=tmp_path,
        progress=False)}
    assert sorted(first) == [3, 4]  # step 4's line is step 4 alone
    model, collator = _model()
    resumed = {e["step"]: e["loss"] for e in train(model, collator, _data(), config,
                                                    output_dir=tmp_path, resume=True,
                                                    progress=False)}
    assert sorted(resumed) == [3, 4, 6, 8]
    # the straight run's step-6 line is the mean of steps 4-6; the resumed one of 5-6
    assert resumed[6] == pytest.approx((3 * whole[6] - first[4]) / 2, rel=1e-5)
    assert resumed[8] == pytest.approx(whole[8], rel=1e-6)
    with pytest.raises(ValueError, match="already at step 8"):
        train(model, collator, _data(), dataclasses.replace(config, steps=5),
              output_dir=tmp_path, resume=True, progress=False)


ROOT = Path(__file__).resolve().parents[1]


def _two_processes(tmp_path, mode: str, cpu: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:  # what accelerate needs to see the processes on a machine without GPUs
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--standalone", str(ROOT / "tests" / "train_worker.py"), str(tmp_path), mode],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["text", "vlm", "compiled", "accumulate", "lora"])
def test_two_processes_train_like_one(tmp_path, mode):
    """Two processes optimise what one process does on the whole batch: each rank's NLL is
    weighed by its share of the answer tokens (DDP's plain average of the ranks' token means
    counted a token of a share with fewer tokens more: parameters 2.3e-2 apart after 4 steps).
    A VLM's share without images leaves the vision tower without gradients, which DDP must
    expect (it waited for them: "Expected to have finished reduction"); its two processes
    build their batches in a DataLoader worker each. "compiled": the two
    processes with TrainConfig.compile against one eager process; "accumulate": each
    process's share in micro-batches of one example (gradients averaged across the processes
    at each step's last micro-batch only); "lora": LoRA adapters on a frozen base, as amvl
    train adds them (DDP averages the gradients of the parameters that train only)."""
    from tests import train_worker

    if mode == "lora":
        pytest.importorskip("peft")

    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    proc = _two_processes(tmp_path, mode)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    group = json.loads((tmp_path / "group.json").read_text())
    assert group["timeout_s"] == train_worker.CONFIG.ddp_timeout == 1234  # not gloo's 1800
    two = load_file(str(tmp_path / "params.safetensors"))
    one = train_worker.single_process(mode == "vlm", lora=mode == "lora")
    if mode == "lora":  # the adapters and the latent tokens' rows trained, the base did not
        untrained = dict(train_worker.build(False, lora=True)[0].named_parameters())
        assert all(torch.equal(one[n], untrained[n]) == ("lora_" not in n and
                                                         "trainable_tokens_delta" not in n)
                   for n in one if ".base_model." in n)
        assert any("trainable_tokens_delta" in n for n in one)
    assert two.keys() == one.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-9, atol=1e-11, msg=name)
    if mode == "accumulate":  # validated in shares: the sums added up are one process's
        from amvl.validation import validate

        model, collator = train_worker.build(False)
        model.load_state_dict(one, strict=False)
        held_out = train_worker.examples(False)[:5]
        (entry,) = [e for e in json.loads((tmp_path / "history.json").read_text())
                    if "eval/nll" in e]
        want = validate(model, collator, held_out, batch_size=3, progress=False)
        assert entry["step"] == train_worker.CONFIG.steps
        assert entry["eval/nll"] == pytest.approx(want["nll"], rel=1e-9)
        assert entry["eval/nll_prior"] == pytest.approx(want["nll_prior"], rel=1e-9)


def test_two_processes_resume_each_its_own_random_state(tmp_path):
    """A run of two processes resumed from a checkpoint ends as the run that went straight
    through, with dropout: each process's random state is saved and taken back. Only the main
    process's was, which every process took on resume: the other one's dropout then drew
    other masks than it would have (parameters 0.16 apart here)."""
    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    proc = _two_processes(tmp_path, "resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rng = torch.load(tmp_path / "resumed" / "checkpoint-3" / "rng.pt", weights_only=True)
    assert not torch.equal(rng["torch"], rng["rank1.torch"])  # they did draw differently
    straight, resumed = (load_file(str(tmp_path / f"{run}.safetensors"))
                         for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_processes_accelerate_does_not_see_are_refused(tmp_path):
    """Plain torchrun without GPUs: accelerate saw one process in each, so each trained alone
    and both wrote (and pruned) the same checkpoints."""
    proc = _two_processes(tmp_path, "text", cpu=False)
    assert proc.returncode != 0
    assert "launched as 2 processes, but accelerate sees 1" in proc.stderr
    assert not (tmp_path / "params.safetensors").exists()


def test_resuming_on_another_number_of_processes_is_refused_unless_asked(tmp_path,
                                                                         monkeypatch):
    """The shares and their noise depend on the process count: a checkpoint of 2 processes
    resumed on 1 continued a different run (parameters 5.9e-3 off) without a word. Asked to
    (a cluster's job requeued on fewer GPUs), it continues with a warning, the same batches."""
    import json

    from amvl.training import OtherRunError

    config = TrainConfig(steps=2, batch_size=2, save_every=1, log_every=1)
    model, collator = _model()
    train(model, collator, _data(), config, output_dir=tmp_path, progress=False)
    state_file = tmp_path / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    model, collator = _model()
    with pytest.raises(OtherRunError, match="trained on 2 processes, this run has 1.*"
                                            "any_process_count=True"):
        train(model, collator, _data(), TrainConfig(steps=4, batch_size=2, log_every=1),
              output_dir=tmp_path, resume=True, progress=False)
    with pytest.warns(UserWarning, match="checkpoint-2 trained on 2 processes and continues on "
                                         "1: the steps' batches continue"):
        history = train(model, collator, _data(), TrainConfig(steps=4, batch_size=2,
                                                               log_every=1),
                        output_dir=tmp_path, resume=True, any_process_count=True,
                        progress=False)
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]


def test_resume_accepts_other_inference_settings_only(tmp_path):
    """``inference`` and ``num_samples`` are read only by generate: a resume that changed them
    was refused as "another AMVLConfig (differs in ['inference', 'num_samples'])"; the settings
    that shape training still are."""
    from amvl.config import INFERENCE_FIELDS
    from amvl.training import OtherRunError

    assert INFERENCE_FIELDS == {"inference", "num_samples"}
    model, collator = _model()
    train(model, collator, _data(), TrainConfig(steps=2, batch_size=2, save_every=1,
                                                log_every=1),
          output_dir=tmp_path, progress=False)
    model, collator = _model()
    model.config.inference, model.config.num_samples = "sample", 4
    history = train(model, collator, _data(), TrainConfig(steps=3, batch_size=2, log_every=1),
                    output_dir=tmp_path, resume=True, progress=False)
    assert [e["step"] for e in history] == [1, 2, 3]
    saved = AMVLConfig.load(tmp_path / "checkpoint-3")  # the run's settings from here on
    assert (saved.inference, saved.num_samples) == ("sample", 4)
    model, collator = _model()
    model.config.num_samples, model.config.beta = 2, 0.5
    with pytest.raises(OtherRunError, match=r"another AMVLConfig \(differs in \['beta'\]\)"):
        train(model, collator, _data(), TrainConfig(steps=4, batch_size=2, log_every=1),
              output_dir=tmp_path, resume=True, progress=False)


def _none_model() -> tuple[AMVLModel, AMVLCollator]:
    """The "none" objective in float64: no latent noise, so micro-batching changes nothing."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch",
                                 objective="none")).double()
    return model, AMVLCollator(tokenizer)


def _ragged_data(n: int = 12) -> list[dict]:
    """Answers of 1 to 6 words: micro-batches of one step hold different numbers of answer
    tokens, which a mean of the micro-batches' token means would weigh wrongly."""
    g = torch.Generator().manual_seed(1)
    return [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
             "answer": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (1 + i % 6,),
                                                                     generator=g))}
            for i in range(n)]


@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_train_the_steps_of_the_whole_batch(micro):
    """Gradient accumulation: a step of 4 examples in micro-batches of 1 or 2 trains the
    parameters and logs the losses of the step of all 4 at once (the NLL over all the step's
    answer tokens, not a mean of the micro-batches' means)."""
    config = TrainConfig(steps=3, batch_size=4, learning_rate=5e-2, log_every=1, seed=2)
    whole, collator = _none_model()
    whole_history = train(whole, collator, _ragged_data(), config, progress=False)
    parts, collator = _none_model()
    accumulated = TrainConfig(**{**config.__dict__, "micro_batch_size": micro})
    parts_history = train(parts, collator, _ragged_data(), accumulated, progress=False)
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)
    for a, b in zip(whole_history, parts_history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-9)


def test_micro_batches_draw_their_own_noise_and_bad_sizes_are_refused(monkeypatch):
    from amvl.training import step_seed

    model, collator = _model()
    seeds = []
    real = AMVLModel.forward

    def recording(self, *args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AMVLModel, "forward", recording)
    train(model, collator, _data(), TrainConfig(steps=2, batch_size=4, micro_batch_size=2,
                                                log_every=1), progress=False)
    assert len(seeds) == 4 and len(set(seeds)) == 4
    assert seeds[0] == step_seed(0, 0, 0)  # the step's first micro-batch: the step's seed
    with pytest.raises(ValueError, match="micro_batch_size 5 is larger than batch_size 4"):
        TrainConfig(batch_size=4, micro_batch_size=5)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="micro_batch_size must be an int >= 1"):
            TrainConfig(batch_size=4, micro_batch_size=bad)


def test_validation_entries_in_the_history_and_checkpoints(tmp_path):
    """Validation every eval_every steps and after the last: entries of eval/* metrics equal
    to amvl.validation's on the model at that step, kept in history.jsonl and in the
    checkpoints, and resumed like the rest."""
    from amvl.validation import validate

    held_out = _data(14)[10:]
    config = TrainConfig(steps=5, batch_size=4, learning_rate=5e-3, log_every=2, save_every=3,
                         eval_every=2, seed=1)
    model, collator = _model()
    stops = []
    history = train(model, collator, _data(), config, output_dir=tmp_path, progress=False,
                    eval_examples=held_out, on_log=stops.append)
    evals = [e for e in history if "eval/nll" in e]
    assert [e["step"] for e in evals] == [2, 4, 5]
    assert {"eval/loss", "eval/kl_fwd", "eval/kl_rev", "eval/nll_prior"} <= evals[-1].keys()
    want = validate(model, collator, held_out, batch_size=4, seed=1, progress=False)
    assert evals[-1] == {"step": 5, **{f"eval/{k}": pytest.approx(v, rel=1e-6)
                                       for k, v in want.items()}}
    assert stops == history  # on_log gets the validation entries too
    logged = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text()
              .splitlines()]
    assert logged == history
    state = json.loads((tmp_path / "checkpoint-3" / "state.json").read_text())
    assert [e["step"] for e in state["history"] if "eval/nll" in e] == [2]
    # resumed from checkpoint-3: the same entries after it
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-5")
    resumed, collator = _model()
    again = train(resumed, collator, _data(), config, output_dir=tmp_path, resume=True,
                  progress=False, eval_examples=held_out)
    assert [e["step"] for e in again] == [e["step"] for e in history]
    assert again[-1] == pytest.approx(history[-1], rel=1e-9)
    with pytest.raises(ValueError, match="eval_every=2, but there are no eval_examples"):
        train(model, collator, _data(), config, progress=False)


def _noise_per_example(monkeypatch):
    """Latent noise a fixed function of each example's prior mean, so a micro-batch draws
    what the whole batch draws for its examples."""
    import amvl_kernels as ak

    sample_kl, sample = ak.gaussian_sample_kl, ak.gaussian_sample

    def eps_of(mu):
        return torch.sin(mu.detach() * 997.0 + 0.3)

    monkeypatch.setattr(ak, "gaussian_sample_kl", lambda mu_q, lv_q, mu_p, lv_p, eps=None,
                        seed=None, **kw: sample_kl(mu_q, lv_q, mu_p, lv_p, eps=eps_of(mu_p),
                                                   **kw))
    monkeypatch.setattr(ak, "gaussian_sample", lambda mu, lv, eps=None, seed=None, **kw:
                        sample(mu, lv, eps=eps_of(mu), **kw))


@pytest.mark.parametrize("objective,settings", [
    ("amvl", {}), ("elbo", {"gamma": 0.5}), ("prior", {}),
    ("amvl", {"kl_schedule": "linear", "kl_warmup_steps": 4}),
])
def test_micro_batches_train_the_whole_batchs_steps_for_every_objective(
        monkeypatch, objective, settings):
    """With the noise fixed per example, micro-batches of 1 train every objective's step of
    the whole batch: the KLs' example means and the NLL's token mean add up as one batch's."""
    _noise_per_example(monkeypatch)

    def build():
        torch.manual_seed(0)
        tokenizer = word_tokenizer(WORDS)
        config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch",
                            objective=objective, **settings)
        return AMVLModel(tiny_qwen2(tokenizer), tokenizer, config).double(), \
            AMVLCollator(tokenizer)

    config = TrainConfig(steps=3, batch_size=4, learning_rate=5e-2, log_every=1, seed=2)
    whole, collator = build()
    train(whole, collator, _ragged_data(), config, progress=False)
    parts, collator = build()
    train(parts, collator, _ragged_data(),
          TrainConfig(**{**config.__dict__, "micro_batch_size": 1}), progress=False)
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


def test_free_bits_across_forwards_are_named():
    model, collator = _model()
    model.config.free_bits = 0.1
    with pytest.warns(UserWarning, match="free_bits=0.1 clamps each forward's batch-mean KL "
                                         "per slot: with 2 forwards a step"):
        train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, micro_batch_size=2),
              progress=False)


def test_validation_in_mixed_precision_and_on_the_console(capsys):
    """Under bf16 the objective's forward runs in autocast (accelerate patches it) and the
    prior means' NLL ran in fp32: their gap, the number to watch, held precision error
    (7.5e-5 nats for "none", where the two are one). The line is printed without the bar."""
    from accelerate.state import AcceleratorState

    model, collator = _none_model()
    model.float()
    AcceleratorState._reset_state(True)  # an earlier test's Accelerator fixed its precision
    try:
        history = train(model, collator, _ragged_data(), TrainConfig(
            steps=1, batch_size=4, mixed_precision="bf16", seed=2), progress=False,
            eval_examples=_ragged_data(16)[8:])
    finally:
        AcceleratorState._reset_state(True)
    entry = history[-1]
    assert entry["eval/nll"] == pytest.approx(entry["eval/nll_prior"], abs=1e-6)
    assert "step 1: eval/loss" in capsys.readouterr().out


def test_micro_batches_are_built_when_they_run(monkeypatch):
    """A step counted its micro-batches' answer tokens from their built batches, so the host
    held every micro-batch (a VLM's processed images) before the first forward; the collator
    now counts them from the answers' text, exactly as the batches' masks would."""
    model, collator = _model()
    collator.max_answer_tokens = 2
    examples = _ragged_data() + [{"question": "w1", "answer": ""}]
    with pytest.warns(UserWarning, match="lost its last"):
        assert collator.answer_tokens(examples) == int(collator(examples)["answer_mask"].sum())
    events = []
    real_collate, real_forward = AMVLCollator.__call__, AMVLModel.forward
    monkeypatch.setattr(AMVLCollator, "__call__", lambda self, ex: events.append("collate")
                        or real_collate(self, ex))
    monkeypatch.setattr(AMVLModel, "forward", lambda self, *a, **k: events.append("forward")
                        or real_forward(self, *a, **k))
    train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, micro_batch_size=2),
          progress=False)
    assert events == ["collate", "forward"] * 2


def test_micro_batching_names_bad_examples_and_sizes_up_front():
    """Counting a step's answer tokens tokenized a None answer (transformers' "You need to
    specify either text or text_target"); a micro_batch_size that cannot divide the batch
    failed only when the model had loaded."""
    model, collator = _model()
    with pytest.raises(ValueError, match="example 2: 'answer' must be a string"):
        collator.answer_tokens([{"question": "w1", "answer": "w2"}] * 2
                               + [{"question": "w1", "answer": None}])
    with pytest.raises(ValueError, match="micro_batch_size 3 does not divide batch_size 32"):
        TrainConfig(batch_size=32, micro_batch_size=3)


def test_a_collator_of_ones_own_still_accumulates():
    """A collator without answer_tokens (a wrapper of one's own) builds the step's
    micro-batches first to count their tokens: the same steps."""
    class Wrapped:
        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            return self.collate(examples)

    config = TrainConfig(steps=2, batch_size=4, learning_rate=5e-2, log_every=1, seed=2)
    whole, collator = _none_model()
    train(whole, collator, _ragged_data(), config, progress=False)
    parts, collator = _none_model()
    train(parts, Wrapped(collator), _ragged_data(),
          TrainConfig(**{**config.__dict__, "micro_batch_size": 1}), progress=False)
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


def test_workers_build_the_same_steps_and_resume_exactly(tmp_path):
    """Batches built ahead in worker processes train the steps of batches built in the loop,
    micro-batches and their token counts included, and leave the global random state (which
    dropout draws from) where the loop leaves it, so a resumed run continues exactly."""
    config = TrainConfig(steps=6, batch_size=4, micro_batch_size=2, learning_rate=5e-3,
                         log_every=2, save_every=3, seed=1)
    in_loop, collator = _model()
    history = train(in_loop, collator, _data(), config, progress=False)
    after_loop = torch.get_rng_state()

    ahead = TrainConfig(**{**config.__dict__, "num_workers": 2})
    workers, collator = _model()
    assert train(workers, collator, _data(), ahead, progress=False) == history
    assert torch.equal(torch.get_rng_state(), after_loop)
    for (name, a), (_, b) in zip(in_loop.state_dict().items(), workers.state_dict().items()):
        assert torch.equal(a, b), name

    class Stop(Exception):
        pass

    def stop_at_four(entry):
        if entry["step"] >= 4:
            raise Stop

    interrupted, collator = _model()
    with pytest.raises(Stop):
        train(interrupted, collator, _data(), ahead, output_dir=tmp_path, on_log=stop_at_four,
              progress=False)
    resumed, collator = _model()
    assert train(resumed, collator, _data(), ahead, output_dir=tmp_path, resume=True,
                 progress=False) == history
    for (name, a), (_, b) in zip(in_loop.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


class _RecordingCollator(AMVLCollator):
    """Writes the process that built each batch to a file; fails on a question "w29"."""

    def __init__(self, tokenizer, record: Path):
        super().__init__(tokenizer)
        self.record = record

    def __call__(self, examples):
        with open(self.record, "a") as file:
            file.write(f"{os.getpid()}\n")
        if any(e["question"] == "w29" for e in examples):
            raise ValueError("a question of w29 alone")
        return super().__call__(examples)


def test_workers_build_the_batches_and_their_errors_reach_the_loop(tmp_path):
    model, collator = _model()
    record = tmp_path / "pids"
    collator = _RecordingCollator(collator.tokenizer, record)
    train(model, collator, _data(), TrainConfig(steps=4, batch_size=4, num_workers=2),
          progress=False)
    builders = {int(line) for line in record.read_text().split()}
    assert len(builders) == 2 and os.getpid() not in builders
    broken = _data(4) + [{"question": "w29", "answer": "w1"}] * 4
    with pytest.raises(ValueError, match="a question of w29 alone") as raised:
        train(model, collator, broken, TrainConfig(steps=4, batch_size=4, num_workers=2),
              progress=False)
    # The traceback held the loop's frame, and with it the workers and their prefetched steps.
    assert raised.traceback and not multiprocessing.active_children()


def test_a_checkpoint_of_before_the_metric_names_were_settled_resumes_under_the_new(tmp_path):
    """The gamma objective's prior-draw NLL was logged as "nll_prior", now the prior means'
    NLL: a resumed run's history and open log window held the draw under both names."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch", gamma=0.5))
    config = TrainConfig(steps=4, batch_size=4, log_every=2, save_every=1)

    def stop_at_four(entry):
        if entry["step"] >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after checkpoint-3, its log window open
        train(model, AMVLCollator(tokenizer), _data(), config, output_dir=tmp_path,
              on_log=stop_at_four, progress=False)
    state_file = tmp_path / "checkpoint-3" / "state.json"
    state = json.loads(state_file.read_text())
    assert "nll_prior_draw" in state["pending"] and "nll_prior_draw" in state["history"][0]
    for entry in (state["history"][0], state["pending"]):  # as an older run wrote them
        entry["nll_prior"] = entry.pop("nll_prior_draw")
    state_file.write_text(json.dumps(state))
    history = train(model, AMVLCollator(tokenizer), _data(), config, output_dir=tmp_path,
                    resume=True, progress=False)
    assert all("nll_prior" not in e and "nll_prior_draw" in e for e in history)


def test_a_resumed_run_trains_at_its_own_schedules_rates(tmp_path):
    """The step count and rates may change on resume (to go on past a finished run): the
    loaded optimizer kept the old schedule's next rate (0 at the end of a linear decay) for
    the first resumed step, and the loaded scheduler the old peak for every later one."""
    first = TrainConfig(steps=2, batch_size=4, learning_rate=1e-3, log_every=1, save_every=1)
    model, collator = _model()
    train(model, collator, _data(), first, output_dir=tmp_path, progress=False)
    longer = TrainConfig(**{**first.__dict__, "steps": 4, "learning_rate": 1e-2})
    model, collator = _model()
    history = train(model, collator, _data(), longer, output_dir=tmp_path, resume=True,
                    progress=False)
    # the first run's rates, then linear decay from 1e-2 over 4 steps at steps 3 and 4
    assert [e["lr"] for e in history] == pytest.approx([1e-3, 5e-4, 5e-3, 2.5e-3])


def test_cuda_random_states_come_back_on_the_gpus_there_are(monkeypatch):
    """A checkpoint of a machine with 8 GPUs resumed on one with 2 (a requeued job,
    ``--any-process-count``): restoring every saved GPU state indexed past the devices; the
    states of the GPUs there are come back, each to its own device."""
    from amvl import training

    _, plain = training._rng_state()
    saved = {"torch": torch.get_rng_state(),
             **{f"cuda{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(8)}}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.__setitem__(device, state))
    training._set_rng_state(saved, plain)
    assert sorted(restored) == [0, 1]
    for device, state in restored.items():
        assert torch.equal(state, saved[f"cuda{device}"])


def test_a_gpu_runs_checkpoint_resumes_where_its_optimizer_state_is_loaded(tmp_path,
                                                                          monkeypatch):
    """optimizer.pt was loaded without map_location, so its tensors came back on the device
    they were saved from: every process of a GPU run put the main process's AdamW state on
    cuda:0, and a machine without CUDA could not resume at all. The checkpoint's optimizer.pt
    is saved again as a GPU run writes it (storages tagged cuda:0), then resumed without
    CUDA."""
    model, collator = _model()
    train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, log_every=1),
          output_dir=tmp_path, progress=False)
    saved = tmp_path / "checkpoint-1"

    def on_cuda(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    registry = torch.serialization._package_registry
    torch.serialization.register_package(1, on_cuda, lambda storage, location: None)
    try:
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):  # what a CPU resume loads
            torch.save(torch.load(saved / name, weights_only=True), saved / name)
    finally:
        registry[:] = [entry for entry in registry if entry[1] is not on_cuda]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device"):  # what the loads had to avoid
        torch.load(saved / "optimizer.pt", weights_only=True)
    model, collator = _model()
    history = train(model, collator, _data(), TrainConfig(steps=2, batch_size=4, log_every=1),
                    output_dir=tmp_path, resume=True, progress=False)
    assert [entry["step"] for entry in history] == [1, 2]


def test_a_resumed_run_trains_with_its_own_weight_decay(tmp_path, monkeypatch):
    """Loading the checkpoint's optimizer took its weight decay too: a run resumed with
    another train.weight_decay trained with the old one, while its checkpoints and history
    recorded the new. Biases and norms stay undecayed."""
    model, collator = _model()
    train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, log_every=1),
          output_dir=tmp_path, progress=False)
    decays = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        decays.append([group["weight_decay"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    model, collator = _model()
    train(model, collator, _data(), TrainConfig(steps=3, batch_size=4, log_every=1,
                                                weight_decay=0.1),
          output_dir=tmp_path, resume=True, progress=False)
    assert decays == [[0.1, 0.0], [0.1, 0.0]]
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [group["weight_decay"] for group in saved["param_groups"]] == [0.1, 0.0]


def test_an_accelerator_of_ones_own_must_not_accumulate():
    """accelerator.backward divides the loss by the accelerator's gradient_accumulation_steps,
    on top of the loop's own accumulation: a 4x smaller gradient, which clipping and AdamW's
    eps see, without a word."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, collator = _model()
    AcceleratorState._reset_state(True)  # an earlier test's Accelerator fixed its precision
    try:
        with pytest.raises(ValueError, match="gradient_accumulation_steps=4: .*micro_batch_size"):
            train(model, collator, _data(), TrainConfig(steps=1, batch_size=4),
                  accelerator=Accelerator(gradient_accumulation_steps=4), progress=False)
        history = train(model, collator, _data(), TrainConfig(steps=1, batch_size=4),
                        accelerator=Accelerator(), progress=False)
    finally:
        AcceleratorState._reset_state(True)
    assert [entry["step"] for entry in history] == [1]


def test_an_accelerator_of_ones_own_trains_in_the_configs_precision():
    """The accelerator's precision trained, whatever TrainConfig.mixed_precision said (and
    the checkpoints recorded), without a word."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, collator = _model()
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(ValueError, match="TrainConfig.mixed_precision='bf16', but the "
                                             "accelerator of your own trains in 'no'"):
            train(model, collator, _data(), TrainConfig(steps=1, batch_size=4,
                                                        mixed_precision="bf16"),
                  accelerator=Accelerator(), progress=False)
    finally:
        AcceleratorState._reset_state(True)


def test_without_a_progress_bar_each_log_is_a_line(capsys):
    """amvl train --no-progress printed validation lines only: a run's log file showed no
    training loss or KL between its start and its end."""
    model, collator = _model()
    history = train(model, collator, _data(), TrainConfig(steps=4, batch_size=4, log_every=2),
                    progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    assert f"loss {history[-1]['loss']:.4g}" in lines[-1] and "kl_fwd" in lines[-1]
    train(model, collator, _data(), TrainConfig(steps=2, batch_size=4, log_every=1),
          progress=True)
    assert "step 1:" not in capsys.readouterr().out  # the bar shows it
