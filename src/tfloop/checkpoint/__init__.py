"""Checkpoints: the :class:`Checkpointer` (when, what, restore, preemption) over a fast writer.

See ``docs/checkpointing.md`` and ``docs/checkpoint-contents.md``.
"""

from tfloop.checkpoint._checkpointer import Checkpointer
from tfloop.checkpoint._fastsave import FastWriter
from tfloop.checkpoint._metadata import position_of

__all__ = ["Checkpointer", "FastWriter", "position_of"]
