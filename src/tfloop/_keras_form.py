"""Step code written for a ``keras.Model``, in a Trainer subclass.

keras-io's guide moves a training step into ``train_step`` and calls Keras's
``compute_loss(x=, y=, y_pred=, sample_weight=)`` there. A Trainer's own ``compute_loss`` is
tfloop's ``compute_loss(batch, training)``; it answers Keras's keyword form too (the Trainer
dispatches on ``y_pred``). A subclass may also *override* ``compute_loss`` with Keras's
signature: :func:`loss_of` then calls the model itself and hands the outputs over, as Keras's
``train_step`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfloop._autograph import user_code
from tfloop.data import unpack_batch

__all__ = ["keras_signature", "loss_of"]

Nested = Any


def keras_signature(method: Callable[..., Any]) -> frozenset[str] | None:
    """The parameters of a ``compute_loss`` with Keras's signature (``x, y, y_pred,
    sample_weight[, training]``); None for tfloop's (``batch, training``).

    Examples:
        >>> def keras_form(self, x=None, y=None, y_pred=None, sample_weight=None): ...
        >>> sorted(keras_signature(keras_form))
        ['sample_weight', 'self', 'x', 'y', 'y_pred']
        >>> keras_signature(lambda self, batch, training: 0) is None
        True
    """
    parameters = frozenset(inspect.signature(method).parameters)
    return parameters if "y_pred" in parameters and "batch" not in parameters else None


def loss_of(
    compute_loss: Callable[..., Any],
    call_model: Callable[[Nested, bool], Nested],
    update_metrics: Callable[..., None],
    keras_parameters: frozenset[str] | None,
) -> Callable[[Nested, bool], tf.Tensor]:
    """The loss tfloop's steps minimise: ``compute_loss(batch, training)``, or for an override
    with Keras's signature, ``compute_loss(x=, y=, y_pred=, sample_weight=)`` of the model's
    outputs (then the compiled metrics are updated here, as Keras's ``train_step`` does)."""
    if keras_parameters is None:

        def tfloop_form(batch: Nested, training: bool) -> tf.Tensor:
            return user_code(compute_loss)(batch, training=training)

        return tfloop_form
    # An override written before Keras 3.3 may take no `training` (Keras checks the same).
    takes_training = "training" in keras_parameters

    def keras_form(batch: Nested, training: bool) -> tf.Tensor:
        x, y, sample_weight = unpack_batch(batch)
        y_pred = call_model(x, training)
        flag = {"training": training} if takes_training else {}
        loss = user_code(compute_loss)(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **flag)
        user_code(update_metrics)(y, y_pred, sample_weight, x=x)
        return loss

    return keras_form
