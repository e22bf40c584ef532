"""The ``tfloop`` command: ``tfloop plot run.jsonl`` draws a run's curves to a PNG.

Examples:
    >>> import os, tempfile
    >>> from tfloop.callbacks import JSONLLogger
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> logger = JSONLLogger(path)
    >>> logger.on_epoch_end(0, {"loss": 1.0})
    >>> logger.on_epoch_end(1, {"loss": 0.5})
    >>> main(["plot", path])  # doctest: +ELLIPSIS
    /...run.png
    0
    >>> os.path.exists(path.replace(".jsonl", ".png"))
    True
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tfloop.errors import TfloopError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfloop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser(
        "plot", help="draw loss/metric curves of a JSONLLogger file to a PNG (needs tfloop[plot])"
    )
    plot.add_argument(
        "log", type=Path, help="a .jsonl file written by tfloop.callbacks.JSONLLogger"
    )
    plot.add_argument("-o", "--output", type=Path, help="the PNG to write (default: LOG with .png)")
    plot.add_argument(
        "-k", "--keys", help="comma-separated keys to draw, e.g. loss,val_loss (default: all)"
    )
    plot.add_argument("--title", help="a title for the figure")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    from tfloop.callbacks.history import History

    output = args.output or args.log.with_suffix(".png")
    keys = [key.strip() for key in args.keys.split(",") if key.strip()] if args.keys else None
    try:
        history = History.from_jsonl(args.log)
        written = history.plot(output, keys=keys, title=args.title)
    except (OSError, TfloopError) as error:
        print(f"tfloop plot: {error}", file=sys.stderr)
        return 1
    print(written)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
