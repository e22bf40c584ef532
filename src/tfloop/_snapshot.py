"""What a check may touch, put back as it was: a check never changes what it checks.

The dry run runs the model (and the loss) eagerly on one batch before anything is traced. That
can move state a later step reads: a layer's ``SeedGenerator`` (keras-io's VAE samples in
``call``, in inference too), metric totals, a ``BatchNormalization``'s statistics in a model
that calls it in training mode, Keras's and TensorFlow's global random generators, the op
seeds of unseeded eager random ops. :func:`unchanged` saves all of it and restores it after the
check, so training after a check equals training without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from tfloop import _distribute

__all__ = ["unchanged"]


@contextlib.contextmanager
def unchanged(variables: Sequence[Any]) -> Iterator[None]:
    """Restores ``variables`` and the global random generators when the block ends (also when
    it raises).

    Examples:
        >>> import tensorflow as tf
        >>> counter = tf.Variable(1)
        >>> with unchanged([counter]):
        ...     _ = counter.assign_add(5)
        >>> int(counter)
        1
    """
    saved = _distribute.save_values([*variables, *_global_generator_states()])
    eager_seeds = _eager_seed_state()
    try:
        yield
    finally:
        _distribute.restore_values(saved)
        _restore_eager_seed_state(eager_seeds)


def _global_generator_states() -> list[Any]:
    """The state variables of Keras's and TensorFlow's global random generators, if they were
    made (reading them must not make them)."""
    states = []
    try:
        from keras.src.backend.common import global_state

        keras_generator = global_state.get_global_attribute("global_seed_generator")
        if keras_generator is not None:
            states.append(keras_generator.state)
    except (ImportError, AttributeError):  # a Keras without it: nothing to keep
        pass
    try:
        from tensorflow.python.ops import stateful_random_ops

        tf_generator = getattr(stateful_random_ops, "global_generator", None)
        if tf_generator is not None:
            states.append(tf_generator.state)
    except (ImportError, AttributeError):
        pass
    return states


def _eager_seed_state() -> Any:
    """The eager context's op-seed sequence (unseeded eager random ops draw from it once a
    global seed is set), or None."""
    try:
        from tensorflow.python.eager import context

        rng = getattr(context.context(), "_rng", None)
        return None if rng is None else (rng, rng.getstate())
    except (ImportError, AttributeError):
        return None


def _restore_eager_seed_state(saved: Any) -> None:
    if saved is not None:
        rng, state = saved
        rng.setstate(state)
