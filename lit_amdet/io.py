"""Files that appear complete or not at all: the one home of atomic writes.

Every file and run folder lit-amdet writes goes through here, so a reader (a
second process, a resumed benchmark, a person) sees the old content or the new
one, never half of either, and an interrupted run leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling of ``path``, then rename it into place (for writers that
    want a path: csv, safetensors, figures). The sibling is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (UTF-8)."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically (values JSON cannot hold are written as strings)."""
    return write_text(path, json.dumps(payload, indent=2, default=str))


def check_writable_folder(path: str | Path | None, what: str = "output folder") -> None:
    """A one-line `ConfigError`, before any work is done, when ``path`` (a folder a run will write; None: none) is
    an existing file or lies under one: found otherwise only when the results are written, after the work."""
    from lit_amdet.errors import ConfigError

    if path is None:
        return
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{folder}: the {what} {'is' if part == folder else 'lies under'} a file ({part})")
            return


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or unreadable one is a one-line `ConfigError` naming it."""
    from lit_amdet.errors import ConfigError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # (too deeply nested)
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from exc


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file (an empty one is {}); a missing or unreadable one is a one-line `ConfigError` naming it."""
    import yaml

    from lit_amdet.errors import ConfigError

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({' '.join(str(exc).split())})") from exc


class StagedFolder:
    """A folder built under a hidden sibling name and renamed into place in one step.

    ``open()`` makes the hidden sibling (``<prefix><name>-XXXX`` next to ``final``), ``commit()`` renames it to
    ``final``, ``discard()`` removes it. Used across hooks (a scan stages in one hook and commits in another)
    or as a context manager (`staged_folder`).
    """

    def __init__(self, final: str | Path, prefix: str = ".staging-", overwrite: bool = True) -> None:
        self.final = Path(final)
        self.prefix = prefix
        self.overwrite = overwrite
        self.path: Path | None = None

    def open(self, clear_stale: bool = False) -> Path:
        """Create the hidden sibling; ``clear_stale`` first removes siblings an interrupted earlier run left."""
        parent = self.final.parent
        parent.mkdir(parents=True, exist_ok=True)
        if clear_stale:
            for stale in parent.glob(f"{self.prefix}{self.final.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{self.final.name}-", dir=parent))
        return self.path

    def commit(self) -> Path:
        """Rename the staged folder to ``final`` (replacing an old one when ``overwrite``)."""
        if self.path is None:
            raise RuntimeError("StagedFolder.commit before open")
        if self.overwrite and self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)  # fails on a non-empty final folder when not overwriting
        self.path = None
        return self.final

    def discard(self) -> None:
        """Remove the staged folder if it was never committed."""
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None


@contextmanager
def staged_folder(final: str | Path, prefix: str = ".staging-", overwrite: bool = True,
                  clear_stale: bool = False) -> Iterator[Path]:
    """``with staged_folder(out) as tmp:`` fill ``tmp``; on success it becomes ``out``, on an error it is gone."""
    stage = StagedFolder(final, prefix, overwrite)
    path = stage.open(clear_stale)
    try:
        yield path
        stage.commit()
    finally:
        stage.discard()


@contextmanager
def removed_unless(kept: Callable[[], bool], *paths: str | Path) -> Iterator[None]:
    """Remove what the block created at ``paths`` when it raises and ``kept()`` is false.

    For folders other code creates as a side effect before the first useful output (Lightning makes its
    logger's version folder, with an event file and ``config.yaml``, before any ``setup`` hook can refuse
    the run): the topmost missing ancestor of each path is noted on entry and removed on a failure, so a
    refused run leaves nothing behind, while a folder that existed before is never touched.
    """
    fresh = {_topmost_missing(Path(p)) for p in paths if p is not None}
    fresh.discard(None)
    try:
        yield
    except BaseException:
        if not kept():
            for path in fresh:
                shutil.rmtree(path, ignore_errors=True)
        raise


def _topmost_missing(path: Path) -> Path | None:
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path
