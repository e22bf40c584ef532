"""The checkpoint directory: writable, cleaned of killed saves; what a Checkpointer is bound to."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfloop.errors import CheckpointError

__all__ = ["check_writable", "remove_temporary_files", "same_objects"]

logger = logging.getLogger("tfloop")


def check_writable(directory: Path) -> None:
    """Creates the directory and proves it writable; a CheckpointError names it if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # One probe per process: the workers of a cluster check the same directory.
        probe = directory / f".tfloop-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"checkpoint directory {str(directory)!r} is not writable ({error}); pass "
            "a directory you can write to, or checkpoint=None."
        ) from error


def remove_temporary_files(directory: Path) -> list[Path]:
    """Deletes the leftovers of a save that was killed halfway.

    TF's saver writes into a ``<prefix>_temp/`` directory; ``SaveV2`` writes each file as
    ``<file>.tempstate<n>`` before renaming it.
    """
    removed = []
    leftovers = {*directory.glob("*_temp*"), *directory.glob("*.tempstate*")}
    for path in sorted(leftovers):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
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
