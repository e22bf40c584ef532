"""The checkpoint directory: writable, cleaned of killed saves; what a Checkpointer is bound to."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tfloop.errors import CheckpointError
from tfloop.io import checks, files

__all__ = ["check_writable", "remove_temporary_files", "same_objects"]

logger = logging.getLogger("tfloop")


def check_writable(directory: str) -> None:
    """Creates the directory and proves it writable (a probe file, written and removed), so a
    permission or credentials problem stops ``fit`` before it trains; a CheckpointError names
    the directory if not."""
    checks.check_writable(
        directory, "checkpoint directory", CheckpointError, fix=", or pass checkpoint=None"
    )


def remove_temporary_files(directory: str) -> list[str]:
    """Deletes the leftovers of a save that was killed halfway.

    TF's saver writes into a ``<prefix>_temp/`` directory; ``SaveV2`` writes each file as
    ``<file>.tempstate<n>`` before renaming it.
    """
    removed = []
    leftovers = {
        *files.glob(files.join(directory, "*_temp*")),
        *files.glob(files.join(directory, "*.tempstate*")),
    }
    for path in sorted(leftovers):
        if files.isdir(path):
            files.rmtree(path)
        else:
            files.remove(path)
        removed.append(path)
    if removed:
        logger.warning(
            "tfloop: removed %d temporary file(s) of an interrupted save in %s",
            len(removed),
            directory,
        )
    return removed


def same_objects(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two mappings of saved objects hold the same objects (compared by identity)."""
    if old.keys() != new.keys():
        return False
    for name, value in new.items():
        previous = old[name]
        if isinstance(value, (list, tuple)) and isinstance(previous, (list, tuple)):
            if len(value) != len(previous) or any(
                a is not b for a, b in zip(value, previous, strict=True)
            ):
                return False
        elif value is not previous:
            return False
    return True
