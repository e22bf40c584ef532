"""``fit`` under ``ParameterServerStrategy``: closures scheduled on a ``ClusterCoordinator``.

Parameter-server training is asynchronous: the variables live on the parameter servers, each
worker runs steps on its own batches and updates them whenever it is done, and this process
(the *coordinator*) only schedules work (TensorFlow's "Parameter server training" guide,
``tf.distribute.coordinator.ClusterCoordinator``). The :class:`CoordinatedController` keeps
the controller's "when" (epochs, validation, checkpoints, callbacks, stop reasons) and replaces
the "what":

- **One closure per superbatch.** Each worker reads its own pipeline, built from the dataset
  function (``ClusterCoordinator.create_per_worker_dataset``), ``K`` batches at a time. A
  closure takes one superbatch and runs its steps with the Trainer's own train step, in the
  same compiled loop as elsewhere (``strategy.run`` per step, in cross-replica context), minus
  XLA (it cannot reach variables on the parameter servers). ``K`` is at most
  ``steps_per_epoch / (2 x workers)``, so that every worker has closures to run.
- **Accumulation stays exact per window**: a window lives in the closure's loop registers, so
  ``K`` is a multiple of ``accumulate_steps`` and so must ``steps_per_epoch`` be; windows never
  span two closures (which may run on two workers at once).
- **Every update is counted.** Keras 3 increments ``optimizer.iterations`` with a
  read-modify-write, which concurrent closures lose (2 workers: 87 of 128 updates counted);
  the update rule makes that increment one atomic add on the parameter server
  (``_update.py``), so ``optimizer.iterations`` is the number of updates applied, between
  joins too (a schedule read in a closure lags only by the updates in flight on other
  workers). The coordinator reads it after each join; it sizes closures (``K /
  accumulate_steps`` updates each) so that a save or ``max_steps`` lands on a join.
- **Checkpoints are written by the coordinator** after a join (model, optimizer, metrics,
  counters; no iterator: per-worker iterators cannot be saved, and a resume starts new
  pipelines).
- **Worker failures** are handled by the coordinator as TensorFlow does: a closure whose worker
  fails is run again on another worker (so some of its updates may be applied twice).

What is *not* guaranteed: bit-identical results to one device, or between two runs (the order
in which workers apply their updates varies), exact metric logs (Keras metric variables are
updated with the same racy read-modify-write as ``optimizer.iterations``), and the order of the
data after a resume.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import tensorflow as tf

from tfloop import _distribute
from tfloop._controller import Controller, FitHooks
from tfloop._fit_args import FitPlan
from tfloop._logs import BATCH, COUNTERS, STEP, WINDOW, without
from tfloop._loops import CompiledLoop
from tfloop.checkpoint import Checkpointer
from tfloop.data import CoordinatedSource
from tfloop.errors import ConfigError

__all__ = ["CLOSURES_PER_JOIN", "CoordinatedController", "controller_for"]

logger = logging.getLogger("tfloop")

CLOSURES_PER_JOIN = 8
"""Closures scheduled between two joins (callbacks see logs after each join)."""


def controller_for(hooks: FitHooks, plan: FitPlan, checkpointer: Checkpointer | None) -> Controller:
    """The controller of one ``fit``: a :class:`CoordinatedController` under
    ``ParameterServerStrategy``, else the synchronous :class:`~tfloop._controller.Controller`."""
    if _distribute.is_parameter_server(hooks.strategy):
        return CoordinatedController(hooks, plan, checkpointer)
    return Controller(hooks, plan, checkpointer)


class CoordinatedController(Controller):
    """Runs one ``fit`` under ``ParameterServerStrategy`` (see the module docstring)."""

    def __init__(self, hooks: FitHooks, plan: FitPlan, checkpointer: Checkpointer | None) -> None:
        super().__init__(hooks, plan, checkpointer)
        source = plan.source
        if not isinstance(source, CoordinatedSource):  # adapt() makes one for a function
            raise ConfigError("under ParameterServerStrategy, data must be a dataset function.")
        k = hooks.micro_batches_per_update
        assert plan.steps_per_epoch is not None  # an endless input needs it (adapt() checks)
        if plan.steps_per_epoch % k:
            raise ConfigError(
                f"steps_per_epoch={plan.steps_per_epoch} must be a multiple of "
                f"accumulate_steps={k} under ParameterServerStrategy: an accumulation window "
                "never spans two closures, which may run on two workers at once."
            )
        # Enough closures per epoch to keep every worker busy (two each), each holding whole
        # accumulation windows: K is a multiple of accumulate_steps.
        workers = _distribute.parameter_server_workers(hooks.strategy)
        steps = min(source.steps_per_execution, plan.steps_per_epoch // (2 * workers))
        source.steps_per_execution = max(k, steps // k * k)
        self.source = source
        self.coordinator = tf.distribute.coordinator.ClusterCoordinator(hooks.strategy)
        self.closure: Any = None
        self.iterator: Any = None

    def start(self) -> None:
        """Settles the checkpoint to resume from, builds, restores; makes the closure and the
        workers' pipelines."""
        checkpointer, source, hooks = self.checkpointer, self.source, self.hooks
        latest = None
        if checkpointer is not None:
            checkpointer.check_writable()
            checkpointer.check_input(source)
            checkpointer.remove_temporary_files()
            latest = checkpointer.latest_readable()
        with hooks.scope():
            hooks.build(source.example_batch())
        if checkpointer is not None:
            checkpointer.bind(hooks.checkpoint_objects(), hooks.strategy)
            checkpointer.bind_monitor(self.trainer)
            if latest is not None:
                path, metadata = latest
                checkpointer.restore_into(path, metadata, None)
                self.data_seed = int(metadata["data_seed"])
                self._resume_from(metadata, path)
        self.step = self._updates()
        self.stream = source.stream(self.epoch)  # empty: the workers read the data
        loop = hooks.train_loop()
        assert isinstance(loop, CompiledLoop)
        spec = dataclasses.replace(
            loop.spec,
            fresh_window=True,
            jit=False,
            jit_fallback=False,
            step_sizes=source.step_sizes,
        )
        body = CompiledLoop(spec).function

        def closure(iterator: Any, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
            return body(next(iterator), tf.constant(0), stop, flush_at)

        self.closure = tf.function(closure)
        per_worker = self.coordinator.create_per_worker_dataset(source.worker_dataset)
        self.iterator = iter(per_worker)

    def _train_epoch(self, resumed: bool) -> tuple[dict[str, float], bool]:
        hooks, plan, checkpointer = self.hooks, self.plan, self.checkpointer
        assert plan.steps_per_epoch is not None and self.trainer is not None
        k = hooks.micro_batches_per_update
        if not resumed:
            hooks.reset_metrics()
        self.info.epoch = self.epoch
        self.callbacks.on_epoch_start(self.epoch, {})
        step_logs: Any = None
        while self.batch < plan.steps_per_epoch and not self._stopping():
            last_step = self.step
            result = None
            for _ in range(CLOSURES_PER_JOIN):
                limit = self._chunk_limit()
                # Every closure closes its last window (it holds whole windows anyway).
                args = (self.iterator, tf.constant(limit), tf.constant(limit - 1))
                result = self.coordinator.schedule(self.closure, args=args)
                self.batch += limit
                self.step += limit // k  # scheduled: what the next closure is sized by
                if self.batch >= plan.steps_per_epoch or self._due(last_step):
                    break
            self.coordinator.join()
            # Every update applied was counted, atomically (see _update.py): read the count.
            self.step = self._updates()
            assert result is not None
            results, step_logs = result.fetch()
            logs = hooks.logs(without(results, [WINDOW]), step_logs)
            logs[STEP], logs[BATCH] = float(self.step), float(self.batch - 1)
            self.callbacks.on_train_batch_end(self.batch - 1, logs)
            if checkpointer is not None and checkpointer.due(self.step, last_step):
                self._save(logs)
                if checkpointer.preempted:
                    self._stop()
            self._check_budgets()
        logs = hooks.logs(without(hooks.results(), [WINDOW]), step_logs)
        return without(logs, COUNTERS), self.batch >= plan.steps_per_epoch

    def _due(self, last_step: int) -> bool:
        """Whether the closures scheduled since ``last_step`` reach a save or ``max_steps``:
        join the workers there (a closure is never scheduled past them)."""
        checkpointer, max_steps = self.checkpointer, self.plan.max_steps
        if max_steps is not None and self.step >= max_steps:
            return True
        return checkpointer is not None and checkpointer.due(self.step, last_step)
