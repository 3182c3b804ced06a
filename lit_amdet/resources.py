"""Files shipped inside the package: the one way configs are found.

The configs live in ``lit_amdet/configs/`` (package data, so a plain ``pip install`` has them; the
repository's ``configs/`` is a link to that folder). `config_path` accepts a path that exists as given, or
the name of a shipped config (``scan.yaml``, ``configs/scan.yaml`` or ``scan``); `asset_path` does the same
for the files the configs refer to (``configs/assets/target.png``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from lit_amdet.errors import ConfigError


def shipped_configs() -> Path:
    """The folder of the shipped configs."""
    return Path(str(files("lit_amdet") / "configs"))


def config_path(name: str | Path) -> Path:
    """``name`` if it is a file; else the shipped config of that name; else a one-line `ConfigError`."""
    given = Path(name)
    if given.is_file():
        return given
    stem = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    shipped = shipped_configs() / stem
    if shipped.is_file() and (given.parent == Path(".") or given.parent.name == "configs"):
        return shipped
    known = ", ".join(sorted(p.name for p in shipped_configs().glob("*.yaml")))
    raise ConfigError(f"{name}: config not found (neither a file nor a shipped config: {known})")


def asset_path(name: str | Path) -> Path:
    """``name`` if it exists; else, for ``configs/assets/FILE`` or ``assets/FILE``, the shipped asset of that
    name (so a shipped config's ``configs/assets/target.png`` is found from any folder); else ``name``."""
    given = Path(name)
    if given.exists() or given.is_absolute() or given.parent.name != "assets" \
            or given.parent.parent not in (Path("."), Path("configs")):
        return given
    shipped = shipped_configs() / "assets" / given.name
    return shipped if shipped.is_file() else given
