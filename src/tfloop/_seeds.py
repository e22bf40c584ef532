"""Seeds of a model: Dropout's (and other noise layers') random state.

The initial weights are not among them: a Keras initializer draws its seed when the layer is
constructed, so ``keras.utils.set_random_seed(seed)`` before creating the model is what makes
them reproducible.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["reseed_generators", "seed_generator_states"]


def seed_generator_states(model: Any) -> list[Any]:
    """The state variables of every Keras seed generator in the model (Dropout, noise)."""
    if not isinstance(model, keras.Model):
        return []
    return [
        generator.state
        for layer in model._flatten_layers(include_self=True)
        for generator in getattr(layer, "_seed_generators", [])
    ]


def reseed_generators(model: Any, seed: int | None) -> None:
    """Gives every Keras seed generator (Dropout, noise layers) a state derived from seed."""
    if seed is None:
        return
    for index, state in enumerate(seed_generator_states(model)):
        state.assign(tf.constant([seed, index], dtype=state.dtype))
