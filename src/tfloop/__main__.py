"""``python -m tfloop`` runs the ``tfloop`` command (see :mod:`tfloop.cli`)."""

from tfloop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
