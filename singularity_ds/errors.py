"""The user-facing errors: each message is one line naming the file, entry, key or rank, and what to do.

Every layer raises these and ``cli.main`` prints them as ``singularity-ds: error: ...`` (exit 2), so
they live here, below everything else. They pickle with their message, so an error raised in a
DataLoader worker or another process arrives whole.
"""


def describe(e: BaseException) -> str:
    """An exception in a few words, for the middle of a one-line error: ``strerror: file`` for OS errors,
    else its type and the first line of its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class SingularityError(Exception):
    """Base class: a failure the user can fix, described in one line."""


class ConfigError(SingularityError, ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


class CheckpointError(SingularityError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the keys."""


class AnnotationError(SingularityError, ValueError):
    """Bad annotation input: the message names the file, the entry index and the key."""


class MediaError(SingularityError, RuntimeError):
    """A media file that cannot be read; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # rebuilt from both arguments (PyTorch's worker re-raise, other processes)
        return type(self), (self.path, self.reason)


class RankLostError(SingularityError, RuntimeError):
    """Another rank of a multi-rank run died, crashed or froze; the message names it."""


class NonFiniteLossError(SingularityError, FloatingPointError):
    """The loss stayed NaN/Inf for ``max_nonfinite_steps`` optimizer steps in a row; the message names the
    steps and the last good checkpoint."""
