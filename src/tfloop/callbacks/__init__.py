"""Callbacks: hooks called by the Trainer between compiled executions."""

from tfloop.callbacks.base import Callback, CallbackList
from tfloop.callbacks.history import History
from tfloop.callbacks.progress import ProgressBar

__all__ = ["Callback", "CallbackList", "History", "ProgressBar"]
