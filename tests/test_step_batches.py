"""A training step's examples on each process, and its micro-batches."""

import pickle

import pytest
import torch

from amvl.data import AMVLCollator
from amvl.step_batches import StepBatches, batch_indices
from amvl.tiny import word_tokenizer

WORDS = [f"w{i}" for i in range(20)]


def _steps(rank: int = 0, world: int = 1, micro_size: int = 3) -> StepBatches:
    examples = [{"question": f"{WORDS[i % 20]} {WORDS[(3 * i) % 20]}", "answer": WORDS[i % 7]}
                for i in range(11)]
    return StepBatches(examples, AMVLCollator(word_tokenizer(WORDS)), start=2, steps=7,
                       batch_size=6, seed=5, rank=rank, world=world, micro_size=micro_size)


def test_processes_split_each_step_and_micro_batches_split_each_share():
    whole = _steps()
    halves = [_steps(rank, world=2) for rank in (0, 1)]
    assert len(whole) == 5
    for step in range(2, 7):
        indices = batch_indices(11, 6, step, seed=5)
        assert whole.share(step) == [whole.examples[i] for i in indices]
        assert halves[0].share(step) + halves[1].share(step) == whole.share(step)
        item = halves[1][step - 2]  # item i is step start + i
        assert len(item) == 1
        expected = whole.collator(halves[1].share(step))
        assert item[0].keys() == expected.keys()
        assert all(torch.equal(item[0][k], expected[k]) for k in expected)
    in_twos = _steps(world=2, micro_size=1)[0]
    assert [int(b["answer_mask"].sum()) for b in in_twos] == \
        [int(m.sum()) for m in whole.collator(_steps(world=2).share(2))["answer_mask"]]


def test_steps_outside_the_run_are_index_errors():
    steps = _steps()
    with pytest.raises(IndexError, match="step 7 is outside steps 2 .. 6"):
        steps[5]
    with pytest.raises(IndexError, match="step 1 is outside"):
        steps[-1]


def test_steps_pickle_for_workers_started_by_spawn():
    steps = _steps()
    copy = pickle.loads(pickle.dumps(steps))
    for got, expected in zip(copy[3], steps[3]):
        assert all(torch.equal(got[k], expected[k]) for k in expected)
