"""The scan's options checked before any model is loaded: a bad value is one `ConfigError` line naming it.

Plain Python beside `lit_amdet.modules.detection`, whose hyperparameters these are: jsonargparse checks their
types, these the ranges and combinations a type cannot say (a scan with no restart or an empty batch would
otherwise end in a division by zero deep inside the search).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from lit_amdet.errors import ConfigError

__all__ = ["check_scan_options"]


def check_scan_options(hp: MutableMapping[str, Any], reads_nulls: bool) -> None:
    """Check a `BackdoorDetection`'s hyperparameters ``hp`` and fill ``pooled_restarts``' default (half the
    restarts). ``reads_nulls``: whether its rule reads the charged restarts' nulls (`CollapseContrastRule`)."""
    if hp["cache_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"cache_dtype must be float32 or bfloat16, not {hp['cache_dtype']!r}")
    if hp["end_restarts"] < 0:
        raise ConfigError(f"end_restarts must be >= 0, not {hp['end_restarts']}")
    for name in ("restarts", "batch_size"):
        if hp[name] < 1:
            raise ConfigError(f"{name} must be at least 1, not {hp[name]}")
    if hp["restarts_per_pass"] not in (None, "auto") and hp["restarts_per_pass"] < 1:
        raise ConfigError(f"restarts_per_pass must be at least 1 (null: all; auto), not {hp['restarts_per_pass']}")
    if hp["pooled_restarts"] is None:
        hp["pooled_restarts"] = hp["restarts"] // 2
    if not 0 <= hp["pooled_restarts"] <= hp["restarts"]:
        raise ConfigError(f"pooled_restarts must be between 0 and restarts ({hp['restarts']}), "
                          f"not {hp['pooled_restarts']}")
    if min(hp["null_restarts"], hp["token_null_restarts"]) < 0 or (hp["null_restarts"] and not reads_nulls):
        raise ConfigError(f"null_restarts and token_null_restarts must be >= 0, and null_restarts needs a rule "
                          f"that reads the nulls, CollapseContrastRule (got {hp['null_restarts']}, "
                          f"{hp['token_null_restarts']})")
