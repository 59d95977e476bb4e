"""Exception classes of cliplab.

Every error a user can cause is a :class:`CliplabError` subclass.  The CLI turns
each into one line on stderr and the exit code in its ``exit_code`` attribute:

==========  =====================================================
exit code   meaning
==========  =====================================================
0           success
1           unexpected internal error (a bug: please report it)
2           bad command-line usage or bad argument value
3           model could not be loaded (spec, checkpoint, network)
4           unreadable or invalid input data (image, CSV, label list)
5           unsafe checkpoint refused (pickled code, needs trust)
130         interrupted (Ctrl-C); finished work is kept
==========  =====================================================
"""

from __future__ import annotations


class CliplabError(Exception):
    """Base class of every user-facing cliplab error."""

    exit_code = 1


class UsageError(CliplabError, ValueError):
    """An argument has a wrong value (empty label list, unknown option...)."""

    exit_code = 2


class DuplicateClassError(UsageError):
    """Two or more class names give the same prompts (equal, or equal once tokenized).

    ``groups`` lists the colliding names, one list per group.
    """

    def __init__(self, groups: list[list[str]], message: str):
        self.groups = [list(g) for g in groups]
        super().__init__(message)


class ModelLoadError(CliplabError):
    """A model spec could not be resolved or its checkpoint could not be read."""

    exit_code = 3


class OfflineError(ModelLoadError):
    """A download was needed but the network (or the hub) is not reachable."""


class CheckpointMismatch(ModelLoadError):
    """A checkpoint does not fit the architecture it is loaded into."""


class DataError(CliplabError, ValueError):
    """Input data (a CSV, a label file, an image list) is malformed."""

    exit_code = 4


class BadImage(DataError):
    """An image file is empty, truncated, corrupt or larger than the pixel limit."""

    def __init__(self, source, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class AmbiguousCheckpoint(ModelLoadError):
    """A weights file does not record a hyper-parameter that its tensor shapes cannot tell.

    Raised instead of guessing (attention head count, GELU vs QuickGELU); the
    message names the value and the argument that sets it.
    """


class UnsafeCheckpoint(ModelLoadError):
    """A pickle that needs arbitrary code to load was refused."""

    exit_code = 5
