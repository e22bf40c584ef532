"""Seeds of a model: reproducible initial weights, and Dropout's random state."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["reseed_generators", "seed_generator_states", "seed_unbuilt_model"]


def seed_unbuilt_model(model: Any, seed: int | None) -> None:
    """Seeds Keras's global RNG before an unbuilt model builds (draws its initial weights)."""
    if seed is not None and not getattr(model, "built", True):
        keras.utils.set_random_seed(seed)


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
