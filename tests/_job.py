"""What the tests' worker scripts share. Imported inside a job; tfloop is imported only when a
callback is made (a worker sets ``TF_CONFIG`` before TensorFlow starts)."""

from __future__ import annotations

import os
from typing import Any


def exit_at_step(step: int) -> Any:
    """A callback that records the update count ``fit`` started from (``first_step``: after a
    restore, the restored count) and ends the process with exit code 3 once ``step`` updates
    are done (never, for a negative ``step``): a worker killed mid-run."""
    import tfloop

    class ExitAtStep(tfloop.Callback):
        first_step = -1

        def on_fit_start(self, logs: Any = None) -> None:
            assert self.trainer is not None
            self.first_step = int(self.trainer.optimizer.iterations.numpy())

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if 0 <= step <= logs["step"]:
                os._exit(3)

    return ExitAtStep()
