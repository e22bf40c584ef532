"""``fit(max_time=...)`` is a budget of the run: the time spent is kept in the checkpoint, and a
resumed run (after a stop or a kill) gets what is left."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import assert_weights_equal, weights_of
from test_training_control import Clock, Crash, CrashAt, Tick, fit, make_trainer

import tfloop
import tfloop.trainer
from tfloop._fit_args import plan_fit


@pytest.fixture
def clock(monkeypatch):
    """The clock max_time is measured with, moved by ``Tick`` (ten seconds per execution)."""
    clock = Clock()
    monkeypatch.setattr(tfloop.trainer, "plan_fit", functools.partial(plan_fit, clock=clock))
    return clock


def _run(directory, clock, max_time, *callbacks):
    checkpointer = tfloop.Checkpointer(directory, every_n_steps=2, every_epoch=False)
    trainer = make_trainer(k=2, callbacks=[Tick(clock), *callbacks], checkpoint=checkpointer)
    fit(trainer, epochs=3, max_time=max_time)
    return trainer


def test_a_fresh_run_gets_the_whole_budget(tmp_path, clock):
    # executions end at +10, +20, +30, +40 s (7 batches an epoch, 2 per execution)
    trainer = _run(tmp_path, clock, 35)
    assert trainer.stop_reason == "max_time" and int(trainer.optimizer.iterations) == 7


def test_a_run_killed_and_resumed_spends_the_budget_of_a_straight_run(tmp_path, clock):
    straight = _run(tmp_path / "straight", clock, 35)
    with pytest.raises(Crash):  # after 20 s; the checkpoint at update 2 has 10 s spent
        _run(tmp_path / "run", clock, 35, CrashAt(4))
    assert Path(tf.train.latest_checkpoint(str(tmp_path / "run"))).name == "ckpt-2"
    resumed = _run(tmp_path / "run", clock, 35)  # 25 s left: three executions
    assert resumed.stop_reason == "max_time"
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 7
    assert_weights_equal(weights_of(resumed.model), weights_of(straight.model))


def test_a_resumed_run_past_its_budget_trains_nothing_more(tmp_path, clock):
    first = _run(tmp_path, clock, 25)  # stops at +30 s, after update 6
    assert first.stop_reason == "max_time" and int(first.optimizer.iterations) == 6
    again = _run(tmp_path, clock, 25)  # 30 s spent already, as max_steps reached already
    assert again.stop_reason == "max_time" and int(again.optimizer.iterations) == 6
    longer = _run(tmp_path, clock, 1000)  # a larger budget goes on to the end
    assert longer.stop_reason == "epochs" and int(longer.optimizer.iterations) == 21
