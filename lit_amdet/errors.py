"""Exception types the API raises; the CLI turns them into one line and exit code 2."""

from pathlib import PurePath


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


# The paths the shipped configs name that a fresh install does not have, and the command that makes each: a
# config run as it is ends in one line that says what to run first (or what to set), not just "no such file".
_MADE_BY = {
    (".cache", "bases"): "the world's bases are built by `make bases`, or `python -m lit_amdet.bases --cache "
                         ".cache/bases` outside the repository, about 30 min of CPU; or give another checkpoint",
    ("runs", "attack_text", "model"): "made by `lit-amdet fit --config attack_text.yaml`; or give your own suspect "
                                      "with --model.init_args.suspect",
    ("runs", "attack_image", "model"): "made by `lit-amdet fit --config attack_image.yaml`",
    ("runs", "finetune", "model"): "made by `lit-amdet fit --config finetune.yaml`",
    ("runs", "pretrain_poisoned", "model"): "made by `lit-amdet fit --config pretrain_poisoned.yaml`",
    ("path", "to"): "a placeholder in the shipped config: set it to your own file",
    ("data", "poisoned_world"): "made by `python -m lit_amdet.datamodules.poisoned --out_dir data/poisoned_world "
                                "--num_samples 5000 --attack lit_amdet.poisoning.BadNets --rate 0.01`",
    ("data", "badnets"): "made by `python -m lit_amdet.datamodules.poisoned --out_dir data/badnets --num_samples "
                         "10000 --rate 0.01 --attack lit_amdet.poisoning.BadNets --attack.size 0.125`",
}


def missing_hint(path: str | PurePath) -> str:
    """`` (how to make it)`` for a missing path that a shipped config names, else ``""``."""
    parts = PurePath(path).parts
    for prefix, how in _MADE_BY.items():
        if parts[:len(prefix)] == prefix:
            return f" ({how})"
    return ""
