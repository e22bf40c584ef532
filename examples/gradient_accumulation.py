"""Gradient accumulation done right, two ways.

Accumulating gradients over k micro-batches lets a small device train with the update
of a k-times larger batch. The usual hand-written version gets four things wrong:

1. It sums the micro-batch gradients and never divides, so every update is k times
   too large (the learning rate silently becomes k * lr).
2. It tests ``batch_index % k``, a name the loop never defines (NameError).
3. Even with the index defined, ``index % k == 0`` is true at index 0, so the first
   update uses one micro-batch and every later window is shifted by one.
4. It rebuilds Python lists of tensors every step (``[a + g for ...]``), which
   allocates new tensors each time and cannot live inside a compiled ``tf.function``;
   the sums belong in ``tf.Variable`` s updated in place.

The exact rule: if micro-batch i has n_i examples and mean-loss gradient g_i, the
update of a window is

    update = sum_i(n_i * g_i) / sum_i(n_i)

which is the gradient of the mean loss over all the window's examples, i.e. the
update of one big batch. A partial last window (fewer than k micro-batches left in
the epoch) is applied with its own total sum_i(n_i): not dropped, not divided by k.

Two correct ways shown here, on scikit-learn's handwritten digits (offline):

(a) ``tfloop.Trainer(..., accumulate_steps=4)``: nothing else to write.
(b) A short hand-written ``tf.function`` loop with ``tfloop.GradientAccumulator``,
    for people who keep their own loop.

``--check`` proves the rule: it trains the same model from the same initial weights
with plain SGD and no shuffling on micro-batches of 8 with ``accumulate_steps=4``,
and on batches of 32 with ``accumulate_steps=1``, then prints the largest absolute
difference between the final weights; way (b) is checked against the same reference.
It uses 1,421 examples, so every epoch ends in a partial window of two unequal
micro-batches (8 + 5 examples). Measured: about 1e-7 (float32 round-off), while
averaging the micro-batch gradients without weighting them is off by about 6e-3.

    python examples/gradient_accumulation.py
    python examples/gradient_accumulation.py --check
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from _datasets import IMAGE_SIZE, NUM_CLASSES, load_digits

import tfloop

Arrays = tuple[np.ndarray, np.ndarray]


def build_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )


def clone_with_weights(model: keras.Model) -> keras.Model:
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    optimizers = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    return optimizers[name](learning_rate=learning_rate)


def train_with_trainer(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    train: Arrays,
    *,
    micro_batch_size: int,
    accumulate_steps: int,
    epochs: int,
    shuffle: bool,
    seed: int,
) -> tfloop.Trainer:
    """Way (a): the Trainer accumulates ``accumulate_steps`` micro-batches per update."""
    trainer = tfloop.Trainer(
        model,
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        accumulate_steps=accumulate_steps,
        seed=seed,
    )
    trainer.fit(train, epochs=epochs, batch_size=micro_batch_size, shuffle=shuffle, verbose=0)
    return trainer


def train_with_own_loop(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    train: Arrays,
    *,
    micro_batch_size: int,
    accumulate_steps: int,
    epochs: int,
) -> None:
    """Way (b): a hand-written loop that keeps its sums in a GradientAccumulator."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables
    accumulator = tfloop.GradientAccumulator(variables, steps=accumulate_steps)

    @tf.function(reduce_retracing=True)
    def micro_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, variables)
        accumulator.accumulate(gradients, weight=tf.shape(x)[0])
        if accumulator.ready:
            accumulator.apply(optimizer)
        return loss

    @tf.function
    def apply_partial_window() -> None:
        # Divided by the window's own example count; a no-op when the window is empty.
        accumulator.apply(optimizer)

    dataset = tf.data.Dataset.from_tensor_slices(train).batch(micro_batch_size)
    for _ in range(epochs):
        for x, y in dataset:
            micro_step(x, y)
        apply_partial_window()


def accuracy_on(model: keras.Model, test: Arrays) -> float:
    probabilities = model.predict(test[0], verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == test[1]))


def max_abs_difference(a: keras.Model, b: keras.Model) -> float:
    return max(
        float(np.max(np.abs(wa - wb)))
        for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True)
    )


def run_demo(args: argparse.Namespace, train: Arrays, test: Arrays) -> dict[str, float]:
    initial = build_model(args.seed)
    trainer_model = clone_with_weights(initial)
    train_with_trainer(
        trainer_model,
        make_optimizer(args.optimizer, args.learning_rate),
        train,
        micro_batch_size=args.micro_batch_size,
        accumulate_steps=args.accumulate_steps,
        epochs=args.epochs,
        shuffle=True,
        seed=args.seed,
    )
    loop_model = clone_with_weights(initial)
    train_with_own_loop(
        loop_model,
        make_optimizer(args.optimizer, args.learning_rate),
        train,
        micro_batch_size=args.micro_batch_size,
        accumulate_steps=args.accumulate_steps,
        epochs=args.epochs,
    )
    results = {
        "trainer_accuracy": accuracy_on(trainer_model, test),
        "own_loop_accuracy": accuracy_on(loop_model, test),
    }
    print(
        f"(a) Trainer(accumulate_steps={args.accumulate_steps}): "
        f"test accuracy {results['trainer_accuracy']:.4f}"
    )
    print(f"(b) own loop + GradientAccumulator: test accuracy {results['own_loop_accuracy']:.4f}")
    return results


def last_window_sizes(num_examples: int, args: argparse.Namespace) -> list[int]:
    """Example counts of the micro-batches in an epoch's last accumulation window."""
    window = args.micro_batch_size * args.accumulate_steps
    remainder = num_examples % window or window
    full, partial = divmod(remainder, args.micro_batch_size)
    return [args.micro_batch_size] * full + ([partial] if partial else [])


def run_check(args: argparse.Namespace, train: Arrays) -> dict[str, float]:
    """Accumulated micro-batches must give the big-batch weights, up to round-off."""
    big_batch = args.micro_batch_size * args.accumulate_steps
    train = (train[0][: args.check_examples], train[1][: args.check_examples])
    initial = build_model(args.seed)
    reference, accumulated, own_loop = (clone_with_weights(initial) for _ in range(3))
    trainer_settings = {"epochs": args.epochs, "shuffle": False, "seed": args.seed}

    train_with_trainer(
        reference,
        keras.optimizers.SGD(learning_rate=args.learning_rate),
        train,
        micro_batch_size=big_batch,
        accumulate_steps=1,
        **trainer_settings,
    )
    train_with_trainer(
        accumulated,
        keras.optimizers.SGD(learning_rate=args.learning_rate),
        train,
        micro_batch_size=args.micro_batch_size,
        accumulate_steps=args.accumulate_steps,
        **trainer_settings,
    )
    train_with_own_loop(
        own_loop,
        keras.optimizers.SGD(learning_rate=args.learning_rate),
        train,
        micro_batch_size=args.micro_batch_size,
        accumulate_steps=args.accumulate_steps,
        epochs=args.epochs,
    )
    results = {
        "max_abs_diff": max_abs_difference(accumulated, reference),
        "own_loop_max_abs_diff": max_abs_difference(own_loop, reference),
        "max_abs_change": max_abs_difference(reference, initial),
    }
    print(
        f"SGD, no shuffling, {args.epochs} epoch(s) over {len(train[0])} examples: "
        f"batches of {big_batch} vs {args.accumulate_steps} accumulated micro-batches "
        f"of {args.micro_batch_size}"
    )
    last_window = " + ".join(map(str, last_window_sizes(len(train[0]), args)))
    print(f"  the last window of each epoch holds micro-batches of {last_window} examples")
    print(f"  weights moved by up to       {results['max_abs_change']:.3e}")
    print(f"  (a) Trainer:   max |diff| = {results['max_abs_diff']:.3e}")
    print(f"  (b) own loop:  max |diff| = {results['own_loop_max_abs_diff']:.3e}")
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare accumulated micro-batches with one big batch"
    )
    # 1421 = 44 * 32 + 13: each epoch ends in a partial window of two unequal micro-batches
    # (8 + 5 examples), the case a divide-by-k implementation gets wrong.
    parser.add_argument(
        "--check-examples",
        type=int,
        default=1421,
        help="training examples used by --check (default: 1421 of the 1437)",
    )
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accumulate-steps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="default: 10, or 2 with --check")
    parser.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="optimizer of the demo; --check always uses SGD",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: 1e-3 for Adam, 0.1 for SGD and --check",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.check else 10
    if args.learning_rate is None:
        args.learning_rate = 0.1 if args.check or args.optimizer == "sgd" else 1e-3
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    train, test = load_digits()
    if args.check:
        return run_check(args, train)
    return run_demo(args, train, test)


if __name__ == "__main__":
    main()
