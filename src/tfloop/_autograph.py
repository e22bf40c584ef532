"""AutoGraph for user code only.

tfloop's own graph code uses no Python control flow on tensors, so AutoGraph has nothing to do
in it, yet converting it (the Trainer's step methods, the accumulator, the data helpers) cost
about 0.7 s of warm-up for every new trainer. So the ``tfloop`` package is added to AutoGraph's
do-not-convert rules, next to ``tensorflow`` and ``keras``: only the compiled loops' own bodies
are converted.

User code keeps AutoGraph, as in any ``tf.function``: an overridden ``train_step`` called by a
loop is converted as usual, and wherever tfloop's code calls something the user may have
written (an overridden ``compute_loss``, a loss function, a ``tf.Module``'s ``__call__``), it
calls it through :func:`user_code`, which converts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx, config

_ENABLED = ag_ctx.ControlStatusCtx(status=ag_ctx.Status.ENABLED)
_NOT_CONVERTED = ("tfloop", "keras", "tensorflow")


def _exclude_tfloop() -> None:
    rule = config.DoNotConvert("tfloop")
    if not any(getattr(r, "_prefix", None) == "tfloop" for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)


_exclude_tfloop()


def user_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` converted by AutoGraph when tracing, if it is user code (not tfloop's, Keras's or
    TensorFlow's); ``fn`` itself otherwise."""
    if tf.executing_eagerly():
        return fn
    function = getattr(fn, "__func__", fn)
    module = getattr(function, "__module__", None) or type(function).__module__ or ""
    if module.split(".")[0] in _NOT_CONVERTED:
        return fn
    converted: Callable[..., Any] = tf.__internal__.autograph.tf_convert(fn, _ENABLED)
    return converted
