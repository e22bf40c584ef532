"""tfloop: a fast, exact, subclassable training loop for TensorFlow 2 and Keras 3.

Examples:
    >>> import tfloop
    >>> sorted(name for name in tfloop.__all__ if name[0].isupper())
    ['Callback', 'Checkpointer', 'GradientAccumulator', 'History', 'Trainer']
"""

from tfloop import callbacks, errors
from tfloop._sidecar import evaluate_checkpoints
from tfloop._version import __version__
from tfloop.accumulate import GradientAccumulator
from tfloop.callbacks import Callback, History
from tfloop.checkpoint import Checkpointer
from tfloop.trainer import Trainer

__all__ = [
    "Callback",
    "Checkpointer",
    "GradientAccumulator",
    "History",
    "Trainer",
    "__version__",
    "callbacks",
    "errors",
    "evaluate_checkpoints",
]
