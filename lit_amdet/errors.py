"""Exception types the API raises; the CLI turns them into one line and exit code 2."""


class LitAmdetError(Exception):
    """Base class of every error lit-amdet raises on purpose (bad input, refused file, ...)."""


class CheckpointError(LitAmdetError):
    """A checkpoint is missing, corrupt, of an unknown architecture, or holds non-finite weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint could only be loaded by unpickling, and the user did not opt in."""


class ConfigError(LitAmdetError):
    """A configuration value or an input file is invalid."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): the one-line form
    in which a library's multi-line error is quoted inside ours."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]
