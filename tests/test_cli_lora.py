"""LoRA through the amvl command: the run config's model.lora section, training adapters on a
frozen base, resuming, and eval / generate loading what a LoRA run saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import amvl.training
from amvl.cli import main
from amvl.run_config import load_run_config

# The AMVLModel's own modules, which train beside the adapters.
OWN_MODULES = ("prior_head", "posterior_head", "injector", "slot_embeddings")


def _lora_config(folder: Path, steps: int, save_every: int, lora: dict | None = None,
                 **train) -> str:
    """A run config of the tiny Qwen2-VL with ``model.lora`` (None: none), written in
    ``folder``; its output directory is ``folder/run``."""
    model = {"path": "tiny-qwen2-vl", "hidden_size": 32}
    if lora is not None:
        model["lora"] = lora
    config = {"model": model,
              "amvl": {"num_slots": 2, "latent_dim": 4, "objective": "elbo"},
              "train": {"steps": steps, "batch_size": 4, "save_every": save_every,
                        "log_every": 1, "learning_rate": 1e-2, **train},
              "data": {"train": "puzzles", "per_family": 4},
              "output_dir": str(folder / "run")}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _write_puzzle_records(folder: Path) -> tuple[list[dict], Path]:
    """The built-in test puzzles (one per family) with their images saved in ``folder``, and
    a JSON-lines file of them as multiple-choice records."""
    from amvl.puzzles import puzzle_suite

    puzzles, lines = puzzle_suite("test", 1), []
    for i, puzzle in enumerate(puzzles):
        puzzle["images"][0].save(folder / f"puzzle{i}.png")
        lines.append(json.dumps({"question": puzzle["question"], "choices": puzzle["choices"],
                                 "answer": puzzle["answer"], "images": [f"puzzle{i}.png"],
                                 "subtask": puzzle["family"], "id": puzzle["id"]}))
    data = folder / "puzzles.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return puzzles, data


# ------------------------------------------------------------------------- the config section


@pytest.mark.parametrize("lora,match", [
    ("{rank: 4}", r"unknown keys in 'model.lora': \['rank'\]"),
    ("{alpha: 8}", "model.lora needs r"),
    ("[4]", "'model.lora' must be a mapping"),
    ("{r: 0}", "model.lora.r must be a positive int, got 0"),
    ("{r: '8'}", "model.lora.r must be a positive int, got '8'"),
    ("{r: true}", "model.lora.r must be a positive int, got True"),
    ("{r: 4.0}", "model.lora.r must be a positive int, got 4.0"),
    ("{r: 4, alpha: 0}", "model.lora.alpha must be a positive number, got 0"),
    ("{r: 4, alpha: lots}", "model.lora.alpha must be a positive number, got 'lots'"),
    ("{r: 4, alpha: .inf}", "model.lora.alpha must be a positive number, got inf"),
    ("{r: 4, dropout: 1.0}", r"model.lora.dropout must be a number in \[0, 1\), got 1.0"),
    ("{r: 4, dropout: -0.1}", r"model.lora.dropout must be a number in \[0, 1\), got -0.1"),
    ("{r: 4, dropout: true}", r"model.lora.dropout must be a number in \[0, 1\), got True"),
    ("{r: 4, target_modules: q_proj}", "model.lora.target_modules must be a non-empty list"),
    ("{r: 4, target_modules: []}", "model.lora.target_modules must be a non-empty list"),
    ("{r: 4, target_modules: ['']}", "model.lora.target_modules must be a non-empty list"),
    ("{r: 4, target_modules: [1]}", "model.lora.target_modules must be a non-empty list"),
    ("{r: 4, target_modules: [q_proj, q_proj]}", "list of distinct module names"),
    ("{r: 4, train_latent_tokens: 1}", "model.lora.train_latent_tokens must be true or false, "
                                       "got 1"),
])
def test_lora_section_mistakes_are_named(tmp_path, lora, match):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {{path: tiny-qwen2-vl, lora: {lora}}}")
    with pytest.raises(SystemExit, match=match):
        load_run_config(path)


def test_lora_section_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: tiny-qwen2-vl, lora: {r: 4}}")
    assert load_run_config(path)["lora_settings"] == {
        "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "train_latent_tokens": True}
    path.write_text("model: {path: tiny-qwen2-vl, lora: {r: 4, alpha: 1.5, dropout: 0.1, "
                    "target_modules: [q_proj], train_latent_tokens: false}}")
    assert load_run_config(path)["lora_settings"] == {
        "r": 4, "alpha": 1.5, "dropout": 0.1, "target_modules": ["q_proj"],
        "train_latent_tokens": False}
    path.write_text("model: {path: tiny-qwen2-vl}")
    assert load_run_config(path)["lora_settings"] is None


def test_lora_without_peft_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    config = _lora_config(tmp_path, steps=1, save_every=1, lora={"r": 4})
    with pytest.raises(SystemExit, match="amvl train: LoRA adapters need the peft package: "
                                         "pip install peft"):
        main(["train", "--config", config, "--no-progress"])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the adapters


@pytest.mark.parametrize("build", ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen2"])
def test_default_targets_are_the_text_decoders_linear_layers(build):
    """By name alone, Qwen2.5-VL's vision MLP (gate_proj, up_proj, down_proj) would get
    adapters too: the default names the text decoder's layers in full."""
    pytest.importorskip("peft")
    import amvl.tiny
    from amvl.config import AMVLConfig
    from amvl.lora import add_adapters
    from amvl.model import AMVLModel
    from amvl.puzzles import vocabulary

    tokenizer = amvl.tiny.word_tokenizer(vocabulary(), vision=build != "tiny_qwen2")
    base = getattr(amvl.tiny, build)(tokenizer)
    linear = {name for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear)}
    decoder = "model.language_model." if build != "tiny_qwen2" else "model."
    expected = {name for name in linear if name.startswith(decoder)}
    assert len(expected) == 2 * 7  # 2 layers of q, k, v, o, gate, up and down projections
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4,
                                                  slot_embeddings=True))
    summary = add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None})
    assert "on 14 modules" in summary
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A")
               for name, _ in model.base.named_modules() if name.endswith(".lora_A")}
    assert adapted == expected
    assert not any("visual" in name for name in adapted)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.split(".")[0] in OWN_MODULES for name in trainable)
    assert "slot_embeddings.weight" in trainable and "the slot embeddings" in summary

    model = AMVLModel(getattr(amvl.tiny, build)(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4))
    with pytest.raises(SystemExit, match="amvl train: model.lora.target_modules: .*qproj"):
        add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["qproj"]})


@pytest.mark.parametrize("objective,roles", [
    ("amvl", ("latent_start", "latent_end", "prior_query", "posterior_query")),
    ("elbo", ("latent_start", "latent_end", "prior_query", "posterior_query")),
    ("prior", ("latent_start", "latent_end", "prior_query")),
    ("none", ()),
])
def test_lora_trains_the_rows_of_the_latent_tokens_its_objective_reads(objective, roles):
    """train_latent_tokens puts PEFT's trainable tokens on the rows the objective reads: the
    "prior" objective has no posterior query slots and "none" no latent block, whose rows
    would cost a copy of the whole embedding matrix a step for a zero gradient."""
    pytest.importorskip("peft")
    from amvl.config import AMVLConfig
    from amvl.lora import add_adapters
    from amvl.model import AMVLModel
    from amvl.tiny import tiny_qwen2, word_tokenizer

    tokenizer = word_tokenizer([f"w{i}" for i in range(30)])
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, objective=objective))
    summary = add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None,
                                   "train_latent_tokens": True})
    embeddings = model.get_input_embeddings()
    if not roles:
        assert type(embeddings).__name__ == "Embedding" and "embedding rows" not in summary
        return
    assert embeddings.token_adapter.token_indices["default"] == sorted(
        model.token_ids[role] for role in roles)
    assert f"the {len(roles)} latent tokens' embedding rows" in summary


def test_default_targets_leave_routers_out_and_name_fused_experts():
    """MoE models: Qwen2-MoE's shared_expert_gate (a linear router) got an adapter by
    default; Qwen3-MoE's experts are fused parameters, which LoRA skipped without a word."""
    pytest.importorskip("peft")
    import transformers as tf

    from amvl.config import AMVLConfig
    from amvl.lora import add_adapters, text_decoder_linear_names
    from amvl.model import AMVLModel
    from amvl.tiny import word_tokenizer

    tokenizer = word_tokenizer([f"w{i}" for i in range(10)])
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    qwen2_moe = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**sizes,
                                                         shared_expert_intermediate_size=32))
    names = text_decoder_linear_names(qwen2_moe)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in names
    assert not any(name.endswith("_gate") or name.endswith(".gate") for name in names)
    llama4 = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**{
        **sizes, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 64,
        "head_dim": 8}))  # its router is a linear layer named "router"
    names = text_decoder_linear_names(llama4)
    assert "model.layers.0.feed_forward.shared_expert.gate_proj" in names
    assert not any(name.endswith("router") for name in names)
    qwen3_moe = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**sizes, head_dim=8))
    model = AMVLModel(qwen3_moe, tokenizer, AMVLConfig(num_slots=2, latent_dim=4))
    summary = add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None})
    assert summary.endswith("the fused expert weights of MoE blocks (1: "
                            "model.layers.0.mlp.experts, ...) get no adapters")


class _Capture:
    """Wraps amvl.training.train to keep the model amvl train trains, with its state before
    and after."""

    def __init__(self) -> None:
        self.model, self.before, self.after = None, None, None
        self._train = amvl.training.train

    def __call__(self, model, *args, **kwargs):
        self.model = model
        self.before = {k: v.clone() for k, v in model.state_dict().items()}
        history = self._train(model, *args, **kwargs)
        self.after = {k: v.clone() for k, v in model.state_dict().items()}
        return history


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run of amvl train (2 steps, a checkpoint each), its config and the captured
    in-memory model, shared by the tests that read it."""
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("lora")
    config = _lora_config(folder, steps=2, save_every=1, lora={"r": 4, "dropout": 0.1})
    capture = _Capture()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(amvl.training, "train", capture)
        assert main(["train", "--config", config, "--no-progress"]) == 0
    return folder, config, capture


def test_lora_training_moves_adapters_heads_and_token_rows_and_leaves_the_base_as_it_was(
        lora_run):
    folder, _, capture = lora_run
    lora = [k for k in capture.after if "lora_" in k]
    heads = [k for k in capture.after if k.split(".")[0] in OWN_MODULES]
    (rows,) = [k for k in capture.after if "trainable_tokens_delta" in k]
    frozen = [k for k in capture.after if k not in lora + heads + [rows]]
    assert lora and heads and len(frozen) > len(lora)
    assert any("visual" in k for k in frozen)
    for key in frozen:  # the base's own weights, its whole embedding matrix among them
        assert torch.equal(capture.before[key], capture.after[key]), key
    for key in [k for k in lora if "lora_B" in k] + heads:
        assert not torch.equal(capture.before[key], capture.after[key]), key
    # the rows of the latent block's bounds and query slots, the placeholder's left out
    ids = capture.model.token_ids
    assert capture.model.get_input_embeddings().token_adapter.token_indices["default"] == sorted(
        ids[role] for role in ("latent_start", "latent_end", "prior_query", "posterior_query"))
    assert (capture.before[rows] != capture.after[rows]).any(-1).all()
    run = folder / "run"
    for saved in (run / "final", run / "checkpoint-2"):  # the adapter, not the base's weights
        assert (saved / "base" / "adapter_model.safetensors").is_file()
        assert not list(saved.rglob("model*.safetensors"))
        adapter = load_file(str(saved / "base" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k or "trainable_tokens_delta" in k for k in adapter)
        assert adapter[next(k for k in adapter if "trainable_tokens_delta" in k)].shape[0] == 4
    record = json.loads((run / "final" / "lora_run.json").read_text())
    assert record["lora"] == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": None,
                              "train_latent_tokens": True}


def test_lora_eval_and_generate_score_as_the_trained_model(lora_run, capsys):
    """final/, a checkpoint and an eval.baselines entry load with the adapter merged into
    the base rebuilt from the run's record, and score and answer as the model in memory at
    the end of training did."""
    from amvl.data import AMVLCollator, VisionTokens
    from amvl.evaluation import evaluate_benchmark
    from amvl.generation import generate_answers
    from amvl.tiny import tiny_image_processor

    folder, config, capture = lora_run
    puzzles, data = _write_puzzle_records(folder)
    trained = capture.model.eval()
    collator = AMVLCollator(trained.tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(trained.base.config))
    reference = evaluate_benchmark(trained, collator, [dict(p, subtask=p["family"])
                                                       for p in puzzles], progress=False)
    expected = [n for p in reference["predictions"] for n in p["nll"]]
    with_baseline = yaml.safe_load(Path(config).read_text())  # the last step's checkpoint
    with_baseline["eval"] = {"baselines": {"step2": str(folder / "run" / "checkpoint-2")}}
    Path(config).write_text(yaml.safe_dump(with_baseline))
    out = folder / "scores.json"
    assert main(["eval", "--config", config, "--benchmark", "jsonl", "--data", str(data),
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"final (prior latents)", "step2"}
    for name, result in results.items():
        scores = [n for p in result["predictions"] for n in p["nll"]]
        assert scores == pytest.approx(expected, rel=1e-5, abs=1e-6), name

    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps({"images": [f"puzzle{i}.png"],
                                             "question": p["question"]}) + "\n"
                                 for i, p in enumerate(puzzles)), encoding="utf-8")
    answers = folder / "answers.jsonl"
    assert main(["generate", "--config", config, "--data", str(questions), "--out",
                 str(answers), "--max-new-tokens", "3", "--batch-size", "2",
                 "--no-progress"]) == 0
    written = [json.loads(line)["prediction"] for line in answers.read_text().splitlines()]
    wanted = [record["prediction"] for record in generate_answers(
        trained, collator, [dict(p, answer="") for p in puzzles], batch_size=2,
        max_new_tokens=3, progress=False)]
    assert written == wanted


# ---------------------------------------------------------------------------------- resume


def test_lora_resume_continues_exactly(tmp_path):
    """A LoRA run stopped after its step-1 checkpoint and resumed logs the losses of an
    uninterrupted run and ends with the same adapter and heads."""
    pytest.importorskip("peft")
    lora = {"r": 4, "dropout": 0.1}  # dropout: the resumed run's generator must continue too
    finals = {}
    for name, stops in (("straight", [2]), ("resumed", [1, 2])):
        folder = tmp_path / name
        folder.mkdir()
        for i, steps in enumerate(stops):
            config = _lora_config(folder, steps=steps, save_every=1, lora=lora,
                                  lr_scheduler="constant")
            assert main(["train", "--config", config, "--no-progress"]
                        + (["--resume"] if i else [])) == 0
        finals[name] = folder / "run"
    histories = [[json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
                 for run in finals.values()]
    assert [e["step"] for e in histories[1]] == [1, 2]
    assert histories[0] == histories[1]
    for file in ("base/adapter_model.safetensors", "amvl_heads.safetensors"):
        straight, resumed = (load_file(str(run / "final" / file)) for run in finals.values())
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (file, key)


def test_resume_with_other_lora_settings_is_refused_before_the_model_loads(tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("peft")
    config = _lora_config(tmp_path, steps=1, save_every=1, lora={"r": 4})
    assert main(["train", "--config", config, "--no-progress"]) == 0

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the settings were compared")

    monkeypatch.setattr("amvl.cli.load_base", no_loading)
    for lora, match in (({"r": 8, "alpha": 8}, r"differs in \['model.lora.r'\]"),
                        ({"r": 4, "target_modules": ["q_proj"]},
                         r"differs in \['model.lora.target_modules'\]"),
                        ({"r": 4, "train_latent_tokens": False},
                         r"differs in \['model.lora.train_latent_tokens'\]"),
                        (None, r"with model.lora \{.*\}, this run has no model.lora \(full "
                               r"fine-tuning\)")):
        config = _lora_config(tmp_path, steps=2, save_every=1, lora=lora)
        with pytest.raises(SystemExit, match=match):
            main(["train", "--config", config, "--resume", "--no-progress"])
    # the same LoRA settings on another base (a dtype the first run left at its default)
    config = _lora_config(tmp_path, steps=2, save_every=1, lora={"r": 4})
    other_base = yaml.safe_load(Path(config).read_text())
    other_base["model"].update(dtype="bfloat16")
    Path(config).write_text(yaml.safe_dump(other_base))
    with pytest.raises(SystemExit, match=r"trained on the base model .* \(differs in "
                                         r"\['model.dtype'\]\): resume it on the same base"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    monkeypatch.undo()
    # the same settings, alpha's default written out: resumed
    config = _lora_config(tmp_path, steps=2, save_every=1, lora={"r": 4, "alpha": 8})
    assert main(["train", "--config", config, "--resume", "--no-progress"]) == 0
    def written_before(checkpoint: str, section: str, key: str) -> None:
        """Make a checkpoint's record one of before ``section.key`` was recorded."""
        record_file = tmp_path / "run" / checkpoint / "lora_run.json"
        record = json.loads(record_file.read_text())
        del record[section][key]
        record_file.write_text(json.dumps(record))

    # a record of before the defaults were filled in (no dtype) resumes on the same base
    written_before("checkpoint-2", "base", "dtype")
    config = _lora_config(tmp_path, steps=3, save_every=1, lora={"r": 4, "alpha": 8})
    assert main(["train", "--config", config, "--resume", "--no-progress"]) == 0
    # a record of before the token rows trained: trained without them
    written_before("checkpoint-3", "lora", "train_latent_tokens")
    config = _lora_config(tmp_path, steps=4, save_every=1, lora={"r": 4, "alpha": 8})
    with pytest.raises(SystemExit, match=r"differs in \['model.lora.train_latent_tokens'\].*"
                                         r"add train_latent_tokens: false"):
        main(["train", "--config", config, "--resume", "--no-progress"])

    full = tmp_path / "full"
    full.mkdir()
    assert main(["train", "--config", _lora_config(full, steps=1, save_every=1),
                 "--no-progress"]) == 0
    monkeypatch.setattr("amvl.cli.load_base", no_loading)
    with pytest.raises(SystemExit, match=r"trained with no model.lora \(full fine-tuning\), "
                                         r"this run has model.lora"):
        main(["train", "--config", _lora_config(full, steps=2, save_every=1, lora={"r": 4}),
              "--resume", "--no-progress"])


def test_lora_runs_that_cannot_load_are_refused_before_any_model_loads(lora_run, tmp_path):
    import shutil

    folder, _, _ = lora_run
    copy = tmp_path / "final"
    shutil.copytree(folder / "run" / "final", copy)
    record = json.loads((copy / "lora_run.json").read_text())
    record["base"]["path"] = str(tmp_path / "moved")
    (copy / "lora_run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"adapts the base model .*moved, which is not there"):
        main(["eval", "--checkpoint", str(copy), "--benchmark", "puzzles", "--no-progress"])
    (copy / "lora_run.json").unlink()  # an adapter saved in Python: its base is unknown
    with pytest.raises(SystemExit, match=r"holds a PEFT adapter but .* has no lora_run.json"):
        main(["generate", "--checkpoint", str(copy), "--data", "q.jsonl", "--out",
              str(tmp_path / "a.jsonl"), "--no-progress"])


def test_a_base_on_disk_whose_vocabulary_grows_saves_and_loads_the_adapter_alone(tmp_path,
                                                                                  capsys):
    """A base with no spare embedding rows (AMVLModel grows it for the latent tokens): PEFT
    saved its whole embedding matrices into every adapter ("save_embedding_layers" auto),
    which then fit only a resized base, and amvl eval failed on a size mismatch."""
    pytest.importorskip("peft")
    from amvl.tiny import tiny_qwen2, word_tokenizer

    words = [f"w{i}" for i in range(30)]
    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    base = tiny_qwen2(tokenizer)
    assert base.config.vocab_size == len(tokenizer)  # no spare rows
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({
        "question": " ".join(words[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
        "answer": words[int(torch.randint(0, 30, (1,), generator=g))]}) + "\n"
        for _ in range(8)))
    (tmp_path / "mc.jsonl").write_text(
        json.dumps({"question": "w1 w2", "choices": ["w3", "w4"], "answer": "w3"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "base"), "lora": {"r": 2}},
        "amvl": {"num_slots": 2, "latent_dim": 4, "kernel_backend": "torch"},
        "train": {"steps": 1, "batch_size": 4, "save_every": 1},
        "data": {"train": str(tmp_path / "train.jsonl")}, "output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    for saved in ("final", "checkpoint-1"):
        adapter = load_file(str(tmp_path / "run" / saved / "base" / "adapter_model.safetensors"))
        # the LoRA weights and the 4 trained token rows, no embedding matrix
        assert adapter and all("lora_" in key or "trainable_tokens_delta" in key
                               for key in adapter), sorted(adapter)
        (rows,) = [tensor for key, tensor in adapter.items() if "trainable_tokens" in key]
        assert rows.shape == (4, base.config.hidden_size)
    capsys.readouterr()
    assert main(["eval", "--config", str(config), "--benchmark", "jsonl", "--data",
                 str(tmp_path / "mc.jsonl"), "--no-progress"]) == 0
    assert "final" in capsys.readouterr().out  # the table's row of the LoRA run
