"""The ``tfloop`` command: ``tfloop plot run.jsonl`` draws a run's curves to a PNG;
``tfloop evaluate-checkpoints script.py DIRECTORY`` evaluates a run's checkpoints as they appear.

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
import importlib
import json
import math
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tfloop.errors import ConfigError, TfloopError
from tfloop.io import files

__all__ = ["load_evaluation", "main"]

DEFAULT_FUNCTION = "evaluation"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfloop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser(
        "plot", help="draw loss/metric curves of a JSONLLogger file to a PNG (needs tfloop[plot])"
    )
    plot.add_argument(
        "log", help="a .jsonl file written by tfloop.callbacks.JSONLLogger (a path or a URL)"
    )
    plot.add_argument("-o", "--output", help="the PNG to write (default: LOG with .png)")
    plot.add_argument(
        "-k", "--keys", help="comma-separated keys to draw, e.g. loss,val_loss (default: all)"
    )
    plot.add_argument("--title", help="a title for the figure")
    evaluate = commands.add_parser(
        "evaluate-checkpoints",
        help="evaluate each checkpoint of a directory, then each new one as it appears",
        description="Runs tfloop.evaluate_checkpoints: one JSON line per checkpoint on stdout.",
    )
    evaluate.add_argument(
        "target",
        help=f"SCRIPT.py[:FUNCTION] or MODULE[:FUNCTION]; FUNCTION (default "
        f"{DEFAULT_FUNCTION!r}) takes no argument and returns (trainer, data)",
    )
    evaluate.add_argument(
        "directory", help="the training job's checkpoint directory (a path or a URL: gs://...)"
    )
    evaluate.add_argument("--steps", type=int, help="batches of data per evaluation (default: all)")
    evaluate.add_argument(
        "--timeout",
        type=float,
        help="stop after this many seconds without a new checkpoint (default: wait forever)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "evaluate-checkpoints":
        return _evaluate_checkpoints(args)
    from tfloop.callbacks.history import History

    output = args.output or _with_suffix(args.log, ".png")
    keys = [key.strip() for key in args.keys.split(",") if key.strip()] if args.keys else None
    try:
        history = History.from_jsonl(args.log)
        written = history.plot(output, keys=keys, title=args.title)
    except (OSError, TfloopError) as error:
        print(f"tfloop plot: {error}", file=sys.stderr)
        return 1
    print(written)
    return 0


def _with_suffix(path: str, suffix: str) -> str:
    """``path`` with its name's suffix replaced (a URL stays a URL)."""
    parent, name = files.split(path)
    stem = name.rpartition(".")[0] if "." in name.lstrip(".") else name
    return files.join(parent, stem + suffix)


def load_evaluation(target: str) -> Callable[[], Any]:
    """The function ``target`` names: ``path/to/script.py[:name]`` (run without its
    ``if __name__ == "__main__":`` block) or ``package.module[:name]``; ``name`` defaults to
    ``evaluation``.

    Examples:
        >>> load_evaluation("json:dumps")([1])
        '[1]'
    """
    where, _, name = target.rpartition(":") if ":" in target else (target, "", "")
    name = name or DEFAULT_FUNCTION
    namespace: dict[str, Any]
    if where.endswith(".py") or "/" in where:
        if files.scheme(where) or not files.exists(where) or files.isdir(where):
            raise ConfigError(f"evaluate-checkpoints: no script at {where!r} (a local file).")
        namespace = runpy.run_path(where, run_name="__tfloop_evaluation__")
    else:
        try:
            namespace = vars(importlib.import_module(where))
        except ImportError as error:
            raise ConfigError(
                f"evaluate-checkpoints: cannot import {where!r} ({error})."
            ) from error
    function = namespace.get(name)
    if not callable(function):
        raise ConfigError(
            f"evaluate-checkpoints: {where!r} defines no function {name!r}; define "
            f"{name}() returning (trainer, data), or name another as {where}:FUNCTION."
        )
    return function  # type: ignore[no-any-return]


def _evaluate_checkpoints(args: argparse.Namespace) -> int:
    from tfloop._sidecar import evaluate_checkpoints

    try:
        made = load_evaluation(args.target)()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise ConfigError(
                f"evaluate-checkpoints: {args.target} must return (trainer, data), got "
                f"{type(made).__name__}."
            )
        trainer, data = made
        results = evaluate_checkpoints(
            trainer, args.directory, data, steps=args.steps, timeout=args.timeout
        )
        for step, logs in results:
            values = {k: v if math.isfinite(v) else None for k, v in logs.items()}
            print(json.dumps({"step": step, **values}), flush=True)
    except TfloopError as error:
        print(f"tfloop evaluate-checkpoints: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
