"""One switch for progress bars: ``progress=False`` or ``CLIPLAB_PROGRESS=0``."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_enabled(progress: bool | None = None) -> bool:
    """Return whether to show a bar: the argument wins, then ``CLIPLAB_PROGRESS``."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("CLIPLAB_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


def progress_bar(iterable=None, *, progress: bool | None = None, **kwargs):
    """A tqdm bar that honours :func:`progress_enabled`; extra kwargs go to tqdm."""
    return tqdm(iterable, disable=not progress_enabled(progress), **kwargs)
