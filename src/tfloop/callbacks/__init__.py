"""Callbacks: hooks called by the Trainer between compiled executions, and the built-in ones."""

from tfloop.callbacks.base import Callback, CallbackList, RunInfo, TrainerView
from tfloop.callbacks.csv_logger import CSVLogger
from tfloop.callbacks.early_stopping import EarlyStopping
from tfloop.callbacks.export_best import ExportBest
from tfloop.callbacks.history import History
from tfloop.callbacks.jsonl_logger import JSONLLogger
from tfloop.callbacks.keras_adapter import KerasCallbacks
from tfloop.callbacks.lr_scheduler import LearningRateScheduler
from tfloop.callbacks.non_finite import NonFiniteGuard, TerminateOnNaN
from tfloop.callbacks.profiler import Profiler
from tfloop.callbacks.progress import ProgressBar
from tfloop.callbacks.reduce_lr import ReduceLROnPlateau
from tfloop.callbacks.tensorboard import TensorBoard
from tfloop.callbacks.throughput import Throughput

__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "ExportBest",
    "History",
    "JSONLLogger",
    "KerasCallbacks",
    "LearningRateScheduler",
    "NonFiniteGuard",
    "Profiler",
    "ProgressBar",
    "ReduceLROnPlateau",
    "RunInfo",
    "TensorBoard",
    "TerminateOnNaN",
    "Throughput",
    "TrainerView",
]
