"""tfloop's file layer: every file tfloop reads or writes (``files``, on ``tf.io.gfile``) and
whether a path may be used (``checks``)."""

from tfloop.io import checks, files

__all__ = ["checks", "files"]
