"""Inputs beyond arrays and tf.data: PyDatasets, generators and iterables of batches, and the
input side of Model.fit's arguments (class_weight, validation_split, sample_weight,
validation_steps).

Each input is checked against a reference on the same batches: arrays for training, Keras's own
functions for class weights and the validation split, Keras's own fit for the PyDataset epoch
events, a straight run for a resume.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import signal
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given
from hypothesis import strategies as st
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils

import tfloop
from tfloop.data import (
    adapt,
    class_weight_to_sample_weights,
    is_arrays,
    split_for_validation,
    with_sample_weight,
)
from tfloop.data._mixed import MixedSteps
from tfloop.errors import ConfigError, DataError

WORKERS = {
    "in-line": {},
    "threads": {"workers": 2},
    "processes": {"workers": 2, "use_multiprocessing": True},
}


class Batches(keras.utils.PyDataset):
    """Batches of ``batch_size`` rows of ``(x, y)``; records the batches read and the epoch
    events (in this process)."""

    def __init__(self, x, y, batch_size, infinite=False, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size, self.infinite = x, y, batch_size, infinite
        self.reads: list[int] = []
        self.events: list[str] = []

    @property
    def num_batches(self):
        return None if self.infinite else math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        self.reads.append(index)
        if self.infinite:
            index %= math.ceil(len(self.x) / self.batch_size)
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]

    def on_epoch_begin(self):
        self.events.append("begin")

    def on_epoch_end(self):
        self.events.append("end")


class Crash(RuntimeError):
    pass


class CrashAfter(tfloop.Callback):
    """Raises ``Crash`` after ``batches`` executions: a run killed mid-training."""

    def __init__(self, batches):
        super().__init__()
        self.left = batches

    def on_train_batch_end(self, batch, logs):
        self.left -= 1
        if self.left == 0:
            raise Crash


def make_trainer(model=None, **kwargs):
    # These tests compare input paths bit for bit. Without XLA every path is exact; with it a
    # superbatch of several batch shapes (a generator's last, partial batch) is another XLA
    # program than one batch shape per call, equal only within float tolerance.
    kwargs.setdefault("jit_compile", False)
    return tfloop.Trainer(
        make_model() if model is None else model,
        keras.optimizers.Adam(0.01),
        "categorical_crossentropy",
        seed=0,
        **kwargs,
    )


def trained(data, **fit_kwargs):
    trainer = make_trainer()
    trainer.fit(data, verbose=0, **fit_kwargs)
    return weights_of(trainer.model)


def batches_of(x, y, batch_size, order=None):
    count = math.ceil(len(x) / batch_size)
    return [
        (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
        for i in (range(count) if order is None else order)
    ]


def stacked(batches):
    return tuple(np.concatenate(part) for part in zip(*batches, strict=True))


# ------------------------------------------------------------------------------- PyDataset


@pytest.mark.parametrize("workers", list(WORKERS), ids=list(WORKERS))
def test_pydataset_trains_like_arrays_on_the_same_batches(workers):
    x, y = make_data(90)  # batches of 16: the last one holds 10
    dataset = Batches(x.astype("float64"), y, 16, **WORKERS[workers])
    expected = trained((x, y), epochs=2, batch_size=16, shuffle=False)
    assert_weights_equal(trained(dataset, epochs=2, shuffle=False), expected)


def test_a_float64_pydataset_is_cast_to_floatx_like_arrays():
    x, y = make_data(20)
    source = adapt(Batches(x.astype("float64"), y, 8))
    assert source.example_batch()[0].dtype == keras.config.floatx()
    assert source.stream(0).peek_batch()[0].dtype == keras.config.floatx()


@pytest.mark.parametrize("workers", ["in-line", "threads"])
def test_a_shuffled_pydataset_reads_a_seeded_order_and_trains_like_arrays_in_it(workers):
    x, y = make_data(96)  # 6 batches of 16
    dataset = Batches(x, y, 16, **WORKERS[workers])
    weights = trained(dataset, epochs=2, shuffle=True)
    read = dataset.reads[2:]  # after the two batches Keras's spec peek reads
    epochs = [read[:6], read[6:]]
    if workers == "threads":  # the pool reads in any order; the batches come back in order
        epochs = [sorted(epoch) for epoch in epochs]
    assert all(sorted(epoch) == list(range(6)) for epoch in epochs)
    if workers == "in-line":
        assert epochs[0] != epochs[1]  # reshuffled every epoch
        in_order = stacked(batches_of(x, y, 16, epochs[0] + epochs[1]))
        assert_weights_equal(weights, trained(in_order, batch_size=16, shuffle=False))
    # The same seed gives the same order, whatever the workers.
    again = Batches(x, y, 16)
    assert_weights_equal(trained(again, epochs=2, shuffle=True), weights)


def test_pydataset_order_depends_on_the_seed():
    x, y = make_data(160)
    orders = []
    for seed in (0, 1):
        dataset = Batches(x, y, 16)
        tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", seed=seed).fit(
            dataset, epochs=1, verbose=0
        )
        orders.append(dataset.reads[2:])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(10))
    assert orders[0] != orders[1]


def test_pydataset_epoch_events_are_called_as_keras_fit_calls_them():
    x, y = make_data(40)
    keras_dataset, tfloop_dataset = Batches(x, y, 16), Batches(x, y, 16)
    model = make_model()
    model.compile("sgd", "categorical_crossentropy")
    model.fit(keras_dataset, epochs=3, verbose=0)
    trained(tfloop_dataset, epochs=3)
    assert keras_dataset.events == ["end", "begin", "end", "begin", "end", "begin", "end"]
    assert tfloop_dataset.events == keras_dataset.events


def test_an_infinite_pydataset_needs_steps_and_reads_on_across_epochs():
    x, y = make_data(64)  # 4 batches of 16, repeated forever
    with pytest.raises(DataError, match="steps_per_epoch"):
        make_trainer().fit(Batches(x, y, 16, infinite=True), epochs=2, verbose=0)
    dataset = Batches(x, y, 16, infinite=True)
    weights = trained(dataset, epochs=3, steps_per_epoch=3)
    assert dataset.reads[2:11] == list(range(9))  # read on: epoch 1 starts at batch 3
    assert dataset.events[:7] == ["end", "begin", "end", "begin", "end", "begin", "end"]
    in_order = stacked(batches_of(x, y, 16, [0, 1, 2, 3, 0, 1, 2, 3, 0]))
    assert_weights_equal(weights, trained(in_order, batch_size=16, shuffle=False))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "crash_after", "infinite"),
    [("in-line", 5, False), ("threads", 9, False), ("processes", 7, False), ("threads", 8, True)],
)
def test_a_pydataset_resumes_mid_epoch_by_count_exactly(tmp_path, workers, crash_after, infinite):
    x, y = make_data(100)  # 7 batches of 16 per epoch (or 6 of an infinite one)
    make = lambda: Batches(x, y, 16, infinite=infinite, **WORKERS[workers])  # noqa: E731
    steps_per_epoch = 6 if infinite else None

    def run(directory, callbacks=()):
        checkpointer = tfloop.Checkpointer(directory, every_n_steps=1, every_epoch=False)
        trainer = make_trainer(checkpoint=checkpointer, callbacks=list(callbacks))
        trainer.fit(make(), epochs=2, steps_per_epoch=steps_per_epoch, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [CrashAfter(crash_after)])
    gc.collect()  # the crashed run's workers stop with it, as they would in a killed process
    resumed = run(tmp_path / "resumed")
    checkpointer = resumed.checkpoint
    metadata = checkpointer.read_metadata(checkpointer.checkpoints[0])
    assert metadata["iterator"] is False  # a count, not an iterator state
    assert adapt(make(), steps=steps_per_epoch).resumes_by_count
    assert int(resumed.optimizer.iterations) == (12 if infinite else 14)
    assert_weights_equal(weights_of(resumed.model), weights_of(straight.model))


class StopAfter(tfloop.Callback):
    def __init__(self, batches):
        super().__init__()
        self.left = batches

    def on_train_batch_end(self, batch, logs):
        self.left -= 1
        if self.left == 0:
            self.trainer.stop_training = True


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_a_pydataset_stopped_mid_epoch_ends_its_epoch_and_stops_its_workers(workers):
    x, y = make_data(100)
    dataset = Batches(x, y, 4, max_queue_size=3, **WORKERS[workers])
    trainer = make_trainer(steps_per_execution=1, callbacks=[StopAfter(3)])
    before = set(multiprocessing.active_children())
    trainer.fit(dataset, epochs=2, verbose=0)
    assert dataset.events == ["end", "begin", "end"]
    assert not [t for t in threading.enumerate() if t.name.startswith("Worker_")]
    deadline = time.monotonic() + 30  # a closed pool's workers exit on their own
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - before


def signal_then_sleep(started):
    started.set()
    time.sleep(60)


def test_forked_workers_still_stop_on_sigterm_while_a_checkpointer_listens(tmp_path):
    # A PyDataset's process pool is forked during fit, while the Checkpointer's preemption
    # handler is installed; the pool stops its workers with SIGTERM, which must still work.
    checkpointer = tfloop.Checkpointer(tmp_path)
    checkpointer.install_signal_handlers()
    try:
        context = multiprocessing.get_context("fork")
        started = context.Event()
        child = context.Process(target=signal_then_sleep, args=(started,))
        child.start()
        assert started.wait(timeout=30)  # a signal before the child runs Python is dropped
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=10)
        alive = child.is_alive()
        if alive:
            child.kill()
            child.join()
        assert not alive and child.exitcode == -signal.SIGTERM
        assert not checkpointer.preempted
    finally:
        checkpointer.uninstall_signal_handlers()


# --------------------------------------------------------------------- generators, iterables


def test_a_generator_trains_like_arrays():
    x, y = make_data(90)
    generator = (batch for batch in batches_of(x, y, 16))
    expected = trained((x, y), batch_size=16, shuffle=False)
    assert_weights_equal(trained(generator, epochs=1), expected)


def test_a_generator_with_steps_per_epoch_is_read_on_across_epochs():
    x, y = make_data(96)
    batches = batches_of(x, y, 16)
    generator = (batches[i % 6] for i in range(10**6))
    weights = trained(generator, epochs=3, steps_per_epoch=4)
    in_order = stacked([batches[i % 6] for i in range(12)])
    assert_weights_equal(weights, trained(in_order, batch_size=16, shuffle=False))


class Reiterable:
    """An object whose ``__iter__`` returns a new iterator each time."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("kind", [list, Reiterable])
def test_a_reiterable_is_read_again_every_epoch(kind):
    x, y = make_data(90)
    expected = trained((x, y), epochs=3, batch_size=16, shuffle=False)
    assert_weights_equal(trained(kind(batches_of(x, y, 16)), epochs=3), expected)


def test_a_generator_read_more_than_once_is_a_data_error_before_anything_runs():
    x, y = make_data(32)
    generator = (batch for batch in batches_of(x, y, 16))
    with pytest.raises(DataError, match=r"steps_per_epoch=.*re-iterable"):
        adapt(generator, passes=3)
    source = adapt(batch for batch in batches_of(x, y, 16))
    list(source.epoch(0))
    with pytest.raises(DataError, match="read only once"):
        source.stream(0)  # it cannot go back to its start
    assert not adapt(batches_of(x, y, 16)).stream(0).exhausted  # a list can


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_epoch", [None, 4])
def test_a_generator_resumes_by_skipping_the_batches_already_trained(tmp_path, steps_per_epoch):
    x, y = make_data(160)
    batches = batches_of(x, y, 16)  # 10 batches
    epochs = 1 if steps_per_epoch is None else 2

    def run(directory, callbacks=()):
        checkpointer = tfloop.Checkpointer(directory, every_n_steps=1, every_epoch=False)
        trainer = make_trainer(checkpoint=checkpointer, callbacks=list(callbacks))
        generator = (batch for batch in batches)  # a new process runs the generator again
        trainer.fit(generator, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [CrashAfter(6)])
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations) == epochs * (steps_per_epoch or 10)
    assert_weights_equal(weights_of(resumed.model), weights_of(straight.model))


def test_input_errors_name_the_argument_and_the_fix():
    x, y = make_data(16)

    def generator_function():
        yield x, y

    with pytest.raises(DataError, match="call it"):
        adapt(generator_function)
    for data in (Batches(x, y, 8), generator_function(), [(x, y)]):
        with pytest.raises(ConfigError, match="batch_size=8"):
            adapt(data, batch_size=8)
    with pytest.raises(DataError, match="empty PyDataset"):
        adapt(Batches(x[:0], y[:0], 8))
    with pytest.raises(DataError, match="tuple of 4"):
        adapt(iter([(x, y, y, y)]))


def test_lists_of_batch_tuples_are_batches_and_other_lists_are_arrays():
    x, y = make_data(8)
    assert is_arrays([x, y]) and is_arrays((x, y)) and is_arrays({"a": x})
    assert not is_arrays([(x, y), (x, y)])
    assert not is_arrays(iter([(x, y)]))
    assert not is_arrays(Batches(x, y, 4))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: (x, y),
        lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(),
        lambda x, y: Batches(x, y, 8),
        lambda x, y: Batches(x, y, 8, infinite=True),
        lambda x, y: batches_of(x, y, 8),
    ],
    ids=["arrays", "infinite-dataset", "pydataset", "infinite-pydataset", "list"],
)
def test_validation_steps_take_the_first_batches_every_time(make):
    x, y = make_data(40)
    data = make(x, y)
    batch_size = 8 if isinstance(data, tuple) else None
    source = adapt(
        data, steps=3, steps_argument="validation_steps", shuffle=False, batch_size=batch_size
    )
    expected = batches_of(x, y, 8)[:3]
    for _ in range(2):  # every validation starts again from the beginning
        got = [
            tuple(np.asarray(t[i]) for t in data)
            for data, start, stop in source.stream(0).chunks(source.steps_per_execution, 3)
            for i in range(start, stop)
        ]
        assert len(got) == 3
        for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(gx, ex)
            np.testing.assert_array_equal(gy, ey)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(),
        lambda x, y: Batches(x, y, 8, infinite=True),
    ],
    ids=["dataset", "pydataset"],
)
def test_an_infinite_validation_input_without_validation_steps_is_a_data_error(make):
    x, y = make_data(16)
    with pytest.raises(DataError, match="validation_steps"):
        adapt(make(x, y), steps_argument="validation_steps", argument="validation_data")


@given(
    n=st.integers(1, 400),
    split=st.floats(0.001, 0.999),
    weighted=st.booleans(),
)
def test_validation_split_takes_the_rows_keras_takes(n, split, weighted):
    x = np.arange(n, dtype="float32")[:, None] * np.ones((1, 2), "float32")
    y = np.arange(n)
    data = (x, y, np.arange(n) * 0.5) if weighted else (x, y)
    try:
        expected = array_slicing.train_validation_split(data, validation_split=split)
    except ValueError:
        with pytest.raises(DataError, match="empty"):
            split_for_validation(data, split)
        return
    got = split_for_validation(data, split)
    for part, reference in zip(got, expected, strict=True):
        assert len(part) == len(data)
        for array, reference_array in zip(part, reference, strict=True):
            np.testing.assert_array_equal(np.asarray(array), np.asarray(reference_array))


def test_validation_split_and_sample_weight_errors():
    x, y = make_data(10)
    assert len(split_for_validation((x, y), 0.8)[1][0]) == 9  # Keras's float rounding
    for bad in (0, 1, 1.5, "0.2", True):
        with pytest.raises(ConfigError, match="validation_split"):
            split_for_validation((x, y), bad)
    with pytest.raises(DataError, match="in-memory arrays"):
        split_for_validation(tf.data.Dataset.from_tensor_slices((x, y)).batch(2), 0.2)
    with pytest.raises(DataError, match="different numbers"):
        split_for_validation((x, y[:9]), 0.2)
    weights = np.arange(10.0)
    data = (x, y)
    assert with_sample_weight(data, None) is data
    assert with_sample_weight((x, y), weights)[2] is weights
    with pytest.raises(ConfigError, match="without targets"):
        with_sample_weight(x, weights)
    with pytest.raises(ConfigError, match="twice"):
        with_sample_weight((x, y, weights), weights)
    with pytest.raises(DataError, match="different numbers"):
        with_sample_weight((x, y), weights[:5])
    with pytest.raises(DataError, match="in-memory arrays"):
        with_sample_weight(Batches(x, y, 4), weights)


# ------------------------------------------------------------------------------ class_weight

labels = st.integers(2, 30).flatmap(
    lambda n: st.one_of(
        st.lists(st.integers(-1, 6), min_size=n, max_size=n).map(np.array),  # sparse
        st.lists(st.integers(0, 6), min_size=n, max_size=n).map(lambda v: np.array(v)[:, None]),
        st.lists(st.integers(0, 4), min_size=n, max_size=n).map(lambda v: np.eye(5)[v]),
        st.lists(st.floats(0, 3, width=32), min_size=n, max_size=n).map(
            lambda v: np.array(v, "float32")  # rounded, half to even
        ),
        st.lists(st.floats(0, 1, width=32), min_size=3 * n, max_size=3 * n).map(
            lambda v: np.array(v, "float32").reshape(-1, 3)  # soft labels: the argmax
        ),
    )
)
class_weights = st.dictionaries(
    st.integers(-1, 7), st.floats(0.0, 10.0, allow_nan=False), max_size=6
)


@given(y=labels, class_weight=class_weights)
def test_class_weights_are_keras_sample_weights(y, class_weight):
    expected = data_adapter_utils.class_weight_to_sample_weights(y, class_weight)
    got = class_weight_to_sample_weights(y, class_weight)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    # Every input gets the same weights: arrays once, a dataset in a map, a PyDataset and a
    # generator per batch (a class missing from the dict weighs 1.0 in all of them).
    x = np.zeros((len(y), 2), "float32")
    inputs = [
        (x, y),
        tf.data.Dataset.from_tensor_slices((x, y)).batch(len(y)),
        Batches(x, y, len(y)),
        iter([(x, y)]),
    ]
    for data in inputs:
        source = adapt(data, class_weight=class_weight, shuffle=False)
        batch = source.stream(0).peek_batch()
        np.testing.assert_array_equal(np.asarray(batch[2]), expected)


@pytest.mark.parametrize("kind", ["arrays", "dataset", "pydataset", "generator"])
def test_class_weight_feeds_the_batches_of_the_equivalent_sample_weight(kind):
    x, y = make_data(40)
    class_weight = {0: 0.5, 2: 4.0}
    weights = data_adapter_utils.class_weight_to_sample_weights(y, class_weight)

    def make(*parts):
        if kind == "arrays":
            return parts
        if kind == "dataset":
            return tf.data.Dataset.from_tensor_slices(parts).batch(16)
        if kind == "pydataset":
            return Batches(*parts, 16) if len(parts) == 2 else WeightedBatches(*parts, 16)
        return iter([tuple(p[i : i + 16] for p in parts) for i in range(0, 40, 16)])

    kwargs = {"batch_size": 16} if kind == "arrays" else {}
    weighted = adapt(make(x, y), class_weight=class_weight, shuffle=False, **kwargs)
    reference = adapt(make(x, y, weights), shuffle=False, **kwargs)
    for a, b in zip(weighted.epoch(0), reference.epoch(0), strict=True):
        assert a.steps == b.steps
        for left, right in zip(steps_of(a), steps_of(b), strict=True):
            for got, want in zip(tf.nest.flatten(left), tf.nest.flatten(right), strict=True):
                np.testing.assert_array_equal(got.numpy(), want.numpy())


def steps_of(piece):
    """The batches of a superbatch piece, each at its own shape (a stack of several shapes is
    a MixedSteps)."""
    if isinstance(piece.data, MixedSteps):
        return [piece.data.step(i) for i in range(piece.steps)]
    return [tf.nest.map_structure(lambda t: t[i], piece.data) for i in range(piece.steps)]  # noqa: B023


class WeightedBatches(Batches):
    def __init__(self, x, y, sample_weight, batch_size):
        super().__init__(x, y, batch_size)
        self.sample_weight = sample_weight

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows], self.sample_weight[rows]


def test_class_weight_errors_name_class_weight():
    x, y = make_data(8)
    weights = np.ones(8)
    dataset = tf.data.Dataset.from_tensor_slices
    cases = [
        ((x, y, weights), ConfigError, "class_weight and sample_weight"),
        (dataset((x, y, weights)).batch(4), ConfigError, "already yields sample weights"),
        (WeightedBatches(x, y, weights, 4), ConfigError, "yields sample weights"),
        ((x, (y, y)), DataError, "single output"),
        (dataset((x, {"a": y, "b": y})).batch(4), DataError, "single output"),
        (iter([(x, {"a": y, "b": y})]), DataError, "single output"),
        (x, DataError, "no targets"),
        ((x, np.zeros((8, 3, 2))), DataError, "one label per example"),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            adapt(data, class_weight={0: 2.0})
    for bad in ([1.0, 2.0], {0.5: 1.0}, {0: "heavy"}):
        with pytest.raises(ConfigError, match="class_weight"):
            adapt((x, y), class_weight=bad)


# -------------------------------------------------------------- through fit's Keras arguments


def test_fit_with_class_weight_equals_fit_with_the_equivalent_sample_weight():
    x, y = make_data(60)
    class_weight = {0: 0.5, 2: 4.0}
    weights = data_adapter_utils.class_weight_to_sample_weights(y, class_weight)
    with_class_weight = make_trainer()
    with_class_weight.fit(x, y, batch_size=16, epochs=2, class_weight=class_weight, verbose=0)
    with_sample_weight = make_trainer()
    with_sample_weight.fit(x, y, batch_size=16, epochs=2, sample_weight=weights, verbose=0)
    assert_weights_equal(weights_of(with_class_weight.model), weights_of(with_sample_weight.model))


def test_fit_with_validation_split_validates_on_the_rows_keras_takes():
    x, y = make_data(50)
    (x_train, y_train), validation = array_slicing.train_validation_split((x, y), 0.3)
    split = make_trainer().fit(x, y, validation_split=0.3, batch_size=8, verbose=0)
    explicit = make_trainer().fit(
        x_train, y_train, validation_data=validation, batch_size=8, verbose=0
    )
    assert split.history == explicit.history


@pytest.mark.parametrize("infinite", [False, True])
def test_fit_validates_a_pydataset_on_its_first_validation_steps_batches(infinite):
    x, y = make_data(64)
    trainer = make_trainer()
    history = trainer.fit(
        x,
        y,
        epochs=2,
        validation_data=Batches(x, y, 16, infinite=infinite),
        validation_steps=2,
        verbose=0,
    )
    first_two = trainer.evaluate(x[:32], y[:32], batch_size=16)
    assert history.history["val_loss"][-1] == pytest.approx(first_two["loss"], rel=1e-6)


def test_a_class_weighted_dataset_keeps_a_checkpointable_iterator(tmp_path):
    x, y = make_data(40)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    source = adapt(dataset, class_weight={1: 3.0})
    assert not source.resumes_by_count
    stream = source.stream(0)
    stream.peek_batch()
    tf.train.Checkpoint(iterator=stream.iterator).save(str(tmp_path / "ckpt"))
