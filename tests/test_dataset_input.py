"""tf.data input of every shape gives the updates of K=1 on the same batches.

Datasets whose batch dimension is unknown (``.batch(n)`` with a last, partial batch), partial
batches in the middle of an epoch, bucketed and padded sequences whose shapes alternate, with
and without accumulation and XLA; evaluate and predict; a resume in the middle of an epoch;
and the bound on traces (at most one per distinct batch shape), whatever order shapes come in.
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given, settings
from hypothesis import strategies as st

import tfloop
from tfloop.data._mixed import MixedSteps
from tfloop.data._stacking import ShapeStacker

VOCABULARY = 40


def sequence_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 4, mask_zero=True),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def sequences(n: int, longest: int = 20, seed: int = 0) -> tuple[tf.RaggedTensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, longest + 1, n)
    tokens = rng.integers(1, VOCABULARY, (n, longest)).astype(np.int32)
    tokens[np.arange(longest) >= lengths[:, None]] = 0
    labels = keras.utils.to_categorical(rng.integers(0, 3, n), 3).astype("float32")
    return tf.RaggedTensor.from_tensor(tokens, padding=0), labels


def bucketed(n: int = 150, batch_size: int = 8, pad_to_boundary: bool = False) -> tf.data.Dataset:
    tokens, labels = sequences(n)
    return (
        tf.data.Dataset.from_tensor_slices((tokens, labels))
        .map(lambda t, y: (t, y))  # ragged slices -> dense [length] tensors
        .bucket_by_sequence_length(
            lambda t, y: tf.shape(t)[0],
            bucket_boundaries=[6, 11, 21] if pad_to_boundary else [6, 11, 16],
            bucket_batch_sizes=[batch_size] * 4,
            pad_to_bucket_boundary=pad_to_boundary,
        )
        .cache()
    )


def padded(n: int = 120, batch_size: int = 8) -> tf.data.Dataset:
    """``padded_batch`` of sequences: each batch padded to its own longest sequence."""
    tokens, labels = sequences(n, longest=10)
    return (
        tf.data.Dataset.from_tensor_slices((tokens, labels))
        .map(lambda t, y: (t, y))
        .padded_batch(batch_size)
    )


def shapes_of(dataset: tf.data.Dataset) -> list[tuple[tuple[int, ...], ...]]:
    return [tuple(tuple(t.shape) for t in tf.nest.flatten(batch)) for batch in dataset]


class Executions(tfloop.Callback):
    """Counts compiled executions (one batch event each) per epoch."""

    def __init__(self):
        self.per_epoch: list[int] = []

    def on_epoch_start(self, epoch, logs):
        self.per_epoch.append(0)

    def on_train_batch_end(self, batch, logs):
        self.per_epoch[-1] += 1


def train(
    dataset, *, steps, jit=False, model=None, epochs=2, accumulate=1, callbacks=(), eager=False
):
    model = model if model is not None else make_model()
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=steps,
        jit_compile=jit,
        accumulate_steps=accumulate,
        callbacks=list(callbacks),
        run_eagerly=eager,
        seed=1,
    )
    history = trainer.fit(dataset, epochs=epochs, verbose=0)
    return trainer, weights_of(model), history.history


def assert_same_training(reference, fused, *, exact: bool) -> None:
    if exact:
        assert_weights_equal(reference[1], fused[1])
        assert reference[2] == fused[2]
    else:
        assert_weights_equal(reference[1], fused[1], rtol=1e-4, atol=1e-5)


class TracesPerEpoch(tfloop.Callback):
    def __init__(self):
        self.counts: list[int] = []

    def on_epoch_end(self, epoch, logs):
        self.counts.append(self.trainer.tracing_count("train"))


@given(
    n=st.integers(20, 90),
    batch_size=st.integers(3, 16),
    steps=st.sampled_from([2, 5, "auto"]),
    accumulate=st.sampled_from([1, 3]),
)
def test_a_partial_last_batch_trains_as_with_one_step_per_execution(
    n, batch_size, steps, accumulate
):
    x, y = make_data(n)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    assert dataset.element_spec[0].shape[0] is None
    reference = train(dataset, steps=1, accumulate=accumulate, epochs=3)
    traces = TracesPerEpoch()
    fused = train(dataset, steps=steps, accumulate=accumulate, epochs=3, callbacks=[traces])
    assert_same_training(reference, fused, exact=True)
    # the partial batch's trace is made in the first epoch and reused by the later ones
    assert traces.counts[0] == traces.counts[-1] <= len(set(shapes_of(dataset)))


def test_a_partial_batch_in_the_middle_of_an_epoch_is_exact():
    x, y = make_data(61)
    # shuffling batches moves the partial one anywhere in the epoch (the same place in every
    # run: a dataset that reshuffles draws a new order for every iterator made from it)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(8)
        .shuffle(8, seed=2, reshuffle_each_iteration=False)
    )
    assert shapes_of(dataset)[-1][0][0] == 8  # it is not last (this seed)
    references = {}
    for jit in (False, True):
        # with Dropout: its random state advances the same way, step by step
        references[jit] = train(dataset, steps=1, jit=jit, model=make_model(dropout=0.3))
        fused = train(dataset, steps=4, jit=jit, model=make_model(dropout=0.3))
        assert_same_training(references[jit], fused, exact=not jit)
    # run_eagerly runs a superbatch of several shapes by runs of one shape
    eager = train(dataset, steps=4, model=make_model(dropout=0.3), eager=True)
    assert_same_training(references[False], eager, exact=False)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("jit", [False, True])
def test_alternating_shapes_stay_fused_and_exact(jit, accumulate):
    dataset = bucketed()
    shapes = shapes_of(dataset)
    runs = 1 + sum(a != b for a, b in itertools.pairwise(shapes))
    assert runs > len(shapes) / 2  # shapes alternate: most runs of one shape are 1 batch long
    reference = train(dataset, steps=1, jit=jit, model=sequence_model(), accumulate=accumulate)
    executions = Executions()
    fused = train(
        dataset,
        steps=16,
        jit=jit,
        model=sequence_model(),
        accumulate=accumulate,
        callbacks=[executions],
        epochs=3,
    )
    again = train(dataset, steps=16, jit=jit, model=sequence_model(), accumulate=accumulate)
    assert_same_training(reference, again, exact=not jit)
    # one execution per superbatch of 16 batches, not one per run of equal shapes
    assert executions.per_epoch == [math.ceil(len(shapes) / 16)] * 3
    assert fused[0].tracing_count("train") <= len(set(shapes))


@pytest.mark.parametrize("make", [padded, lambda: bucketed(pad_to_boundary=True)])
def test_padded_and_bucketed_batches_evaluate_and_predict_as_unfused(make):
    dataset = make()
    model = sequence_model()
    results = {}
    for steps in (1, 8):
        trainer = tfloop.Trainer(
            model, loss="categorical_crossentropy", metrics=["accuracy"], steps_per_execution=steps
        )
        results[steps] = trainer.evaluate(dataset)
        features = dataset.map(lambda x, y: x)
        if len({shape[0][1:] for shape in shapes_of(dataset)}) == 1:
            results[f"predict {steps}"] = trainer.predict(features)
    assert results[1].keys() == {"loss", "accuracy"}
    for key in results[1]:
        np.testing.assert_allclose(results[8][key], results[1][key], rtol=1e-5)
    direct = np.concatenate([model(x, training=False).numpy() for x, _ in dataset])
    for key in ("predict 1", "predict 8"):
        if key in results:
            np.testing.assert_allclose(results[key], direct, rtol=1e-5, atol=1e-6)


def test_predict_on_mixed_batch_sizes_keeps_every_example():
    x, _ = make_data(45)
    model = make_model()
    features = tf.data.Dataset.from_tensor_slices(x).batch(8)  # 5 batches of 8, one of 5
    trainer = tfloop.Trainer(model, loss="categorical_crossentropy", steps_per_execution=4)
    np.testing.assert_allclose(
        trainer.predict(features), model(x, training=False).numpy(), rtol=1e-5, atol=1e-6
    )


def test_a_resume_mid_epoch_with_alternating_shapes_is_exact(tmp_path):
    class Crash(RuntimeError):
        pass

    class CrashAt(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            if logs["step"] >= 25:
                raise Crash

    def run(directory, callbacks=()):
        model = sequence_model()
        trainer = tfloop.Trainer(
            model,
            "adam",
            "categorical_crossentropy",
            ["accuracy"],
            steps_per_execution=8,
            callbacks=list(callbacks),
            # saves land inside superbatches: the leftover steps (of several shapes) are saved
            checkpoint=tfloop.Checkpointer(directory, every_n_steps=5, every_epoch=False),
            seed=0,
        )
        trainer.fit(bucketed(), epochs=2, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [CrashAt()])
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations)
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))
    for left, right in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    assert resumed.evaluate(bucketed()) == straight.evaluate(bucketed())


def test_a_mirrored_strategy_runs_mixed_superbatches_by_runs_as_one_device():
    from test_distribute import mirrored  # one strategy per session (collective keys)

    x, y = make_data(61)
    # full batches of 8 and a partial one, mid-epoch: the superbatch around it is mixed
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(8)
        .shuffle(8, seed=2, reshuffle_each_iteration=False)
    )
    reference = train(dataset, steps=1)
    strategy = mirrored()
    with strategy.scope():
        model = make_model()
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=4,
        jit_compile=False,
        strategy=strategy,
        seed=1,
    )
    trainer.fit(dataset, epochs=2, verbose=0)
    assert_weights_equal(reference[1], weights_of(model), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- the bound on traces


@settings(max_examples=200)  # no TensorFlow graph: fast
@given(
    superbatches=st.lists(
        st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=12
    ),
    repeat=st.booleans(),
)
def test_a_source_never_traces_more_than_its_distinct_shapes(superbatches, repeat):
    """Whatever order batch shapes come in, the pieces the stacker makes need at most one
    compiled trace per distinct shape: a plain stack is traced per shape, a mixed one per
    tuple of shapes."""
    spec = (tf.TensorSpec([None, 2], tf.float32),)
    stacker = ShapeStacker(spec)
    traces = set()
    seen = set()
    for sizes in superbatches * (2 if repeat else 1):
        longest = max(sizes) + 1
        stack = (tf.zeros([len(sizes), longest, 2]),)
        rows = tf.constant([[size + 1] for size in sizes], tf.int32)
        seen |= {size + 1 for size in sizes}
        steps = 0
        for piece in stacker.pieces(stack, rows, k=6):
            data = piece.data
            if isinstance(data, MixedSteps):
                traces.add(("mixed", data.shapes))
                kept = data.which.numpy()[: piece.steps]
                assert [data.shapes[i][0][0] for i in kept] == [
                    s + 1 for s in sizes[steps : steps + piece.steps]
                ]
            else:
                traces.add(("plain", tuple(data[0].shape[1:])))
                assert data[0].shape[1] == sizes[steps] + 1
            steps += piece.steps
        assert steps == len(sizes)
    assert len(traces) <= len(seen)
