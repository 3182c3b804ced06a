"""Parquet and Arrow tables of image-caption pairs with the images in them, read in place.

`ColumnPairs` reads ``.parquet`` / ``.arrow`` files (one, a brace pattern, a
folder, or a folder written by ``datasets.save_to_disk``: see
`lit_amdet.datamodules.shards.resolve_source`) whose image column holds
encoded bytes (img2dataset's parquet output, a raw binary column), a
``{"bytes", "path"}`` struct (a ``datasets`` Image column) or file names.
Parquet is read one row group at a time and Arrow files are memory-mapped,
with pyarrow directly: ``datasets.load_dataset`` would first copy every image
into its Arrow cache, which a 1 M-sample set must not need. Captions (and
keys) are read once to build the index, and image headers are checked then,
so bad rows are skipped or refused (``bad_samples``) before the embedding pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lit_amdet.datamodules.shards import (
    BadSampleLog,
    PackedStrings,
    SourceFiles,
    decode_image,
    image_problem,
    open_image,
    unique_keys,
)
from lit_amdet.errors import ConfigError, first_line


def image_value(value: Any, where: str, root: Path | None):
    """A table's image cell as an RGB PIL image: bytes, a ``{"bytes", "path"}`` struct (a ``datasets`` Image
    column), a file name (relative to ``root``), or a PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), where)
    if not value:
        raise ConfigError(f"{where}: no image")
    path = Path(str(value))
    if not path.is_absolute() and root is not None:
        path = root / path
    try:  # raster formats only, as for shard members (no EPS: PIL would run Ghostscript on it)
        with open_image(path.read_bytes()) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: unreadable image {path} ({exc})") from exc


class _TableFile:
    """One parquet file (read a row group at a time) or one memory-mapped Arrow file (one group: all rows)."""

    def __init__(self, path: Path, kind: str) -> None:
        import pyarrow as pa

        self.path, self.kind = path, kind
        self.key_column: str | None = None
        if kind == "parquet":
            import pyarrow.parquet as pq

            self.parquet = pq.ParquetFile(str(path), memory_map=True)
            self.columns = self.parquet.schema_arrow.names
            self.groups = self.parquet.num_row_groups
            return
        source = pa.memory_map(str(path))
        try:  # datasets writes the Arrow stream format, other writers the file format
            self.table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            self.table = pa.ipc.open_stream(source).read_all()
        self.columns, self.groups = self.table.column_names, 1

    def rows(self, group: int) -> int:
        """How many rows a group holds (from the file's metadata, readable when the group's data is not)."""
        if self.kind == "parquet":
            return self.parquet.metadata.row_group(group).num_rows
        return self.table.num_rows

    def read(self, group: int, columns: list[str]):
        if self.kind == "parquet":
            return self.parquet.read_row_group(group, columns=columns)
        return self.table.select(columns)


class ColumnPairs(Dataset):
    """Image-caption pairs from ``.parquet`` / ``.arrow`` files, read in place (nothing is copied to a cache).

    Args:
        files: the table files, in order.
        text_column / image_column: the caption column and the image column (None: text only).
        image_root: folder that file names in the image column are relative to.
        bad: what happens to bad samples (`BadSampleLog`); an unreadable file or row group names its rows.
        key_column: a column of sample keys, used when present (img2dataset writes ``key``).
    """

    def __init__(self, files: SourceFiles, text_column: str, image_column: str | None = None,
                 image_root: Path | None = None, bad: BadSampleLog | None = None, key_column: str = "key") -> None:
        self.bad = bad if bad is not None else BadSampleLog()
        self.text_column, self.image_column, self.image_root = text_column, image_column, image_root
        self.parts: list[_TableFile] = []
        rows: list[tuple[int, int, int]] = []
        keys: list[str] = []
        captions: list[str] = []
        for path in files.files:
            part = self._open(path, files.kind, key_column)
            if part is None:
                continue
            self.parts.append(part)
            self._index(part, len(self.parts) - 1, rows, keys, captions)
        if not captions:
            raise ConfigError(f"{files.files[0]}: no usable rows in {len(files.files)} file(s)")
        self.rows = np.asarray(rows, dtype=np.int64)  # (file, row group, row in group)
        self.captions = PackedStrings(captions)
        stems = [self.parts[int(f)].path.stem for f in self.rows[:, 0]]
        self.keys = PackedStrings(unique_keys(keys, stems))
        self._cached: tuple[tuple[int, int], Any] | None = None

    def _open(self, path: Path, kind: str, key_column: str) -> _TableFile | None:
        try:
            part = _TableFile(path, kind)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
            self.bad(path, None, "unreadable", f"not a readable {kind} file ({first_line(exc)})")
            return None
        for c in (self.text_column, self.image_column):
            if c and c not in part.columns:
                raise ConfigError(f"{path}: no column {c!r} (columns: {', '.join(part.columns)})")
        part.key_column = key_column if key_column in part.columns else None
        return part

    def _index(self, part: _TableFile, number: int, rows: list, keys: list, captions: list) -> None:
        start = 0
        for g in range(part.groups):
            wanted = [c for c in (self.text_column, part.key_column, self.image_column) if c]
            try:
                table = part.read(g, list(dict.fromkeys(wanted)))
            except Exception as exc:  # a corrupt row group: its rows are unreadable
                self.bad(part.path, None, "unreadable", f"row group {g} unreadable ({first_line(exc)})")
                start += part.rows(g)  # the later rows keep their own row numbers (their keys)
                continue
            texts = table.column(self.text_column).to_pylist()
            names = table.column(part.key_column).to_pylist() if part.key_column else None
            images = table.column(self.image_column) if self.image_column else None
            for r, text in enumerate(texts):
                key = str(names[r]) if names is not None else self._row_key(images, r, start + r)
                problem = self._problem(text, images, r)
                if problem:
                    self.bad(part.path, key, *problem)
                    continue
                rows.append((number, g, r))
                keys.append(key)
                captions.append(text.strip())
            start += len(texts)

    def _row_key(self, images, r: int, row: int) -> str:
        """A file-name image cell names the sample; otherwise its row in the file."""
        value = images[r].as_py() if images is not None else None
        return value if isinstance(value, str) and value else str(row)

    def _problem(self, text: Any, images, r: int) -> tuple[str, str] | None:
        if not isinstance(text, str) or not text.strip():
            return "bad caption", f"empty or non-text value in column {self.text_column!r}"
        if images is None:
            return None
        value = images[r].as_py()
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if not value:
            return "no image", f"no value in column {self.image_column!r}"
        if isinstance(value, bytes):
            problem = image_problem(value)
            return ("bad image", problem) if problem else None
        return None

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.bad.entries

    @property
    def with_images(self) -> bool:
        return self.image_column is not None

    def __len__(self) -> int:
        return len(self.captions)

    def text(self, index: int) -> str:
        return self.captions[index]

    def sample_key(self, index: int) -> str:
        """The ``key`` column's value, else the image file name, else the row number in its file
        (``<file stem>/`` before each when they repeat across files)."""
        return self.keys[index]

    def image(self, index: int):
        f, g, r = (int(v) for v in self.rows[index])
        if self._cached is None or self._cached[0] != (f, g):  # the predict loop reads in order: one group
            self._cached = ((f, g), self.parts[f].read(g, [self.image_column]).column(0))
        where = f"{self.parts[f].path}: sample {self.keys[index]}"
        return image_value(self._cached[1][r].as_py(), where, self.image_root)

    def __getitem__(self, index: int) -> dict:
        image = self.image(index) if self.image_column else None
        return {"text": self.captions[index], "image": image, "index": index}
