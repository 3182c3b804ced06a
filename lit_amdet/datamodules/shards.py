"""CLIP training data as it ships: webdataset tar shards and parquet/arrow tables with image bytes.

`ShardPairs` reads webdataset shards (one ``.tar``, a brace pattern such as
``data/{00000..00331}.tar``, or a folder of ``*.tar``) as img2dataset writes
them: the members of one sample share a key (``00000001.jpg`` +
``00000001.txt`` [+ ``.json``], grouped by `member_key`) as a map-style
data set with a stable index ``0..N-1``. `resolve_source` also finds the
``.parquet`` / ``.arrow`` files that `lit_amdet.datamodules.tables.ColumnPairs`
reads; the bad-sample policy (`BadSampleLog`) and the image checks are shared.

Why our own reader (stdlib ``tarfile`` and an index of member offsets) and
neither the ``webdataset`` package nor ``datasets``' webdataset builder:

- the scan's predict loop needs a map-style data set whose index is the same
  in every process, so that `lit_amdet.sample_scan.gather_predictions` puts
  the predictions of several DDP processes back in data-set order;
  ``webdataset.WebDataset`` is an ``IterableDataset`` (shards are dealt to
  workers, there is no index), and ``datasets`` gives a map-style set only
  after converting every shard into its Arrow cache: a full copy of a
  1 M-sample set, image bytes included (its streaming mode is iterable again);
- untrusted shards must never execute code (SPEC §6): webdataset's default
  decoders unpickle ``.pyd`` / ``.pickle`` members and ``torch.load``
  ``.pth`` ones unless ``WDS_SECURE=1`` is set (webdataset issue #490);
  ``datasets`` removed the pickle decoders but still decodes every member it
  recognises (json, npy, msgpack, cbor, ``.pth``). We read two members per
  sample, the image bytes (through PIL, restricted to `IMAGE_FORMATS`: no
  EPS, whose decoder runs Ghostscript) and the caption as UTF-8; no other
  member's content is read, and links, devices and other non-regular
  members are never followed;
- a truncated or corrupt shard must be reported with the shard file and the
  key where it broke; ``tarfile`` stops silently at a truncated or garbled
  header, and neither library names the key;
- no new dependency.

The cost: at start every process reads the tar headers (512-byte blocks) and
the first 4 KiB of every image (its header is checked, so an undecodable
image is found before the embedding pass), and holds about 50 bytes per sample.
Compressed shards (``.tar.gz``) are refused: they cannot be read at random.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from torch.utils.data import Dataset

from lit_amdet.errors import ConfigError, first_line, missing_hint

BadSamples = Literal["fail", "skip"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: the raster formats PIL may open (JPEG covers MPO); PIL picks the format by content, not by the extension
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
HEAD_BYTES = 4096
MAX_CAPTION_BYTES = 1 << 20
MAX_FILES = 1_000_000
TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}

# webdataset's rule (tariterators.base_plus_ext): the key is the name up to the first dot of its last part
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ---------------------------------------------------------------------------
# names: members, brace patterns, sources
# ---------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name (``"00000001.jpg"`` -> ``("00000001", "jpg")``, the extension
    lower-cased); None for a name with no extension (such a member belongs to no sample)."""
    match = _MEMBER.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def member_key(name: str) -> str | None:
    """The sample key a tar member belongs to: the rule `ShardPairs` groups by (and a filtered-shard writer
    must use), webdataset's own: the member name up to the first dot of its last path part."""
    parts = split_member(name)
    return parts[0] if parts else None


def unsafe_name(name: str) -> bool:
    """Whether a tar member name leads out of the folder it would be extracted to: absolute, or with a ``..``
    part (webdataset's writers make neither)."""
    return name.startswith(("/", "\\")) or ".." in PurePosixPath(name.replace("\\", "/")).parts


def numbered_pattern(folder: str | Path, count: int) -> Path:
    """The brace pattern ``folder/{00000..NNNNN}.tar`` of ``count`` shards numbered from 0, as
    `lit_amdet.datamodules.poisoned.write_pair_shards` names them (and `expand_braces` reads them back)."""
    return Path(folder) / f"{{00000..{count - 1:05d}}}.tar"


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..003}`` ranges (zero-padded when an end is, counting down when the
    first end is larger), left to right, as the shell and ``braceexpand`` do; nested braces are not expanded."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, rest = match.group(1), expand_braces(pattern[match.end():])
    numbers = _RANGE.match(body)
    if numbers:
        a, b = numbers.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= MAX_FILES:
            raise ConfigError(f"{pattern}: the range {{{body}}} names more than {MAX_FILES} files")
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        choices = ["{" + body + "}"]
    return [pattern[:match.start()] + c + r for c in choices for r in rest]


@dataclass
class SourceFiles:
    """The files a shard or table source names, in order, and their kind (``tar``, ``parquet`` or ``arrow``)."""

    kind: str
    files: list[Path]


def resolve_source(source: str) -> SourceFiles | None:
    """The shard or table files ``source`` names: a ``.tar`` / ``.parquet`` / ``.arrow`` file, a brace pattern of
    them, a folder of them (``*.tar`` first: img2dataset puts its metadata ``.parquet`` next to the shards) or
    a ``datasets.save_to_disk`` folder. None when ``source`` is none of these (world, text, csv/json, hub)."""
    path = Path(source).expanduser()
    if "{" in source and "}" in source:
        return _pattern_files(source)
    if path.is_dir():
        return _folder_files(path)
    if source.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise ConfigError(f"{path}: compressed shards cannot be read at random; give uncompressed .tar shards")
    kind = "tar" if path.suffix == ".tar" else TABLE_KINDS.get(path.suffix)
    if kind is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{path}: no such file{missing_hint(path)}")
    return SourceFiles(kind, [path])


def _pattern_files(pattern: str) -> SourceFiles:
    files = [Path(p).expanduser() for p in expand_braces(pattern)]
    kinds = {"tar" if p.suffix == ".tar" else TABLE_KINDS.get(p.suffix) for p in files}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(f"{pattern}: a pattern must name only .tar, only .parquet or only .arrow files")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"{pattern}: {len(missing)} of its {len(files)} files do not exist "
                          f"(the first: {missing[0]})")
    return SourceFiles(kinds.pop(), files)


def _folder_files(folder: Path) -> SourceFiles:
    state = folder / "state.json"
    if state.is_file():  # datasets.save_to_disk: its Arrow files in order
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{state}: not a datasets save_to_disk state file ({first_line(exc)})") from None
        return SourceFiles("arrow", [folder / n for n in names])
    for kind, suffix in (("tar", ".tar"), ("parquet", ".parquet"), ("arrow", ".arrow")):
        # a hidden name is the temporary of an atomic write killed midway (`lit_amdet.io.write_with`), not data
        files = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))
        if files:
            return SourceFiles(kind, files)
    raise ConfigError(f"{folder}: a folder source must hold .tar shards, .parquet or .arrow files, "
                      "or be a datasets save_to_disk folder")


# ---------------------------------------------------------------------------
# bad samples, images, packed strings
# ---------------------------------------------------------------------------


class BadSampleLog:
    """What happens to a bad sample: ``fail`` raises a one-line `ConfigError` naming the shard and the key,
    ``skip`` records ``{"shard", "key", "reason", "detail"}`` in `entries` and the sample is left out
    (key None: a whole shard, file or row group that could not be read)."""

    def __init__(self, mode: BadSamples = "fail") -> None:
        if mode not in ("fail", "skip"):
            raise ConfigError(f"bad_samples must be 'fail' or 'skip' (got {mode!r})")
        self.mode = mode
        self.entries: list[dict[str, Any]] = []

    def __call__(self, shard: Path, key: str | None, reason: str, detail: str) -> None:
        if self.mode == "fail":
            where = f"{shard}: sample {key}" if key is not None else str(shard)
            raise ConfigError(f"{where}: {detail} (data.bad_samples: skip leaves such samples out)")
        self.entries.append({"shard": str(shard), "key": key, "reason": reason, "detail": detail})


def open_image(data: bytes):
    """A lazily opened PIL image from encoded bytes (header parsed, pixels not yet decoded)."""
    from PIL import Image

    Image.init()  # registers the plugins (once); a Pillow built without one of the formats leaves it out
    return Image.open(io.BytesIO(data), formats=[f for f in IMAGE_FORMATS if f in Image.OPEN])


def pil_problem(exc: BaseException) -> str:
    """PIL's complaint in one line, without the in-memory file's address that ``UnidentifiedImageError`` quotes."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return f"undecodable image (not {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]})"
    return f"undecodable image ({first_line(exc)})"


def decode_image(data: bytes, where: str):
    """Encoded image bytes -> an RGB PIL image; an undecodable one is a `ConfigError` that says ``where``."""
    try:
        with open_image(data) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise ConfigError(f"{where}: {pil_problem(exc)}") from None


def image_problem(head: bytes, read_all: Callable[[], bytes] | None = None) -> str | None:
    """Why an image's header cannot be read (None when it can): tried on ``head`` first, then on the whole
    image (``read_all``) when its header reaches past ``head``."""
    for attempt in (lambda: head, read_all):
        if attempt is None:
            break
        try:
            with open_image(attempt()):
                return None
        except Exception as exc:  # as in decode_image
            problem = pil_problem(exc)
    return problem


class PackedStrings:
    """Many strings in one UTF-8 buffer with offsets: no Python object per string, so forked DataLoader
    workers do not copy a million-sample index page by page as reference counts change."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self.buffer = b"".join(encoded)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")


def skipped_summary(entries: Sequence[dict[str, Any]], listed: int = 20) -> dict[str, Any]:
    """The report's ``skipped`` block: how many bad samples were left out, by reason, and the first few."""
    from collections import Counter

    return {"count": len(entries), "by_reason": dict(Counter(e["reason"] for e in entries)),
            "first": list(entries[:listed])}


def unique_keys(keys: Sequence[str], stems: Sequence[str]) -> list[str]:
    """The keys as they are when no key repeats across the set, else every key prefixed ``<file stem>/``."""
    if len(set(keys)) == len(keys):
        return list(keys)
    return [f"{s}/{k}" for s, k in zip(stems, keys)]


# ---------------------------------------------------------------------------
# webdataset shards
# ---------------------------------------------------------------------------


@dataclass
class ShardSample:
    """One indexed sample: its key, caption and where its image's bytes lie in the shard."""

    key: str
    caption: str
    image_offset: int
    image_size: int


@dataclass
class Rejected:
    """A sample (key None: a whole shard) that cannot be used, and why."""

    key: str | None
    reason: str
    detail: str


@dataclass
class _Group:
    """The members of one sample so far, while its shard is read."""

    key: str
    caption: str | None = None
    image: tuple[int, int] | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def finish(self, caption_extension: str) -> ShardSample | Rejected:
        if self.problems:
            return Rejected(self.key, *self.problems[0])
        note = f"; {', '.join(self.ignored)} not read" if self.ignored else ""
        if self.image is None:
            return Rejected(self.key, "no image", f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}){note}")
        if self.caption is None:
            return Rejected(self.key, "no caption", f"no caption member (.{caption_extension}){note}")
        return ShardSample(self.key, self.caption, *self.image)


def _kind(info: tarfile.TarInfo) -> str:
    return ("symlink" if info.issym() else "hard link" if info.islnk() else "directory" if info.isdir()
            else "sparse file" if info.issparse() else "device or fifo")


def _add_member(group: _Group, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, caption_extension: str,
                check_images: bool) -> None:
    """Put one member into its sample: the caption is read, the image located (and its header checked)."""
    if not info.isreg() or info.issparse():  # links are never followed, devices never opened
        group.ignored.append(f"{info.name} ({_kind(info)})")
    elif ext == caption_extension:
        if group.caption is not None:
            group.problems.append(("duplicate", f"two .{ext} members"))
        elif info.size > MAX_CAPTION_BYTES:
            group.problems.append(("bad caption", f"caption of {info.size} bytes"))
        else:
            _read_caption(group, tar.extractfile(info).read())
    elif ext in IMAGE_EXTENSIONS:
        if group.image is not None:
            group.problems.append(("duplicate", "two image members"))
            return
        group.image = (info.offset_data, info.size)
        if check_images:
            problem = _member_image_problem(tar, info)
            if problem:
                group.problems.append(("bad image", problem))


def _member_image_problem(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str | None:
    """`image_problem` of an image member: its first `HEAD_BYTES`, the whole member only if need be."""
    def whole() -> bytes:
        return tar.extractfile(info).read()

    return image_problem(tar.extractfile(info).read(HEAD_BYTES), whole if info.size > HEAD_BYTES else None)


def _read_caption(group: _Group, data: bytes) -> None:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        group.problems.append(("bad caption", "caption is not UTF-8 text"))
        return
    if text:
        group.caption = text
    else:
        group.problems.append(("bad caption", "empty caption"))


def _archive_end(tar: tarfile.TarFile) -> str | None:
    """Why the archive did not end cleanly (None if it did): ``tarfile`` stops without a word at a truncated or
    garbled header, so the block where it stopped must be the zero block that ends every archive."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return "truncated (no end-of-archive block)"
    if block.count(0) != tarfile.BLOCKSIZE:
        return "corrupt member header"
    return None


def scan_shard(path: Path, caption_extension: str = "txt", check_images: bool = True,
               ) -> Iterator[ShardSample | Rejected]:
    """The samples of one shard in member order; a sample that breaks off where the shard is truncated or
    corrupt is `Rejected` with that key (the samples before it are kept), a shard that is no tar with key None."""
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        yield Rejected(None, "unreadable", f"not a readable tar file ({first_line(exc)})")
        return
    group: _Group | None = None
    seen: set[str] = set()
    with tar:
        try:
            for info in tar:
                parts = split_member(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if group is not None and key != group.key:
                    yield group.finish(caption_extension)
                    group = None
                if group is None:
                    group = _Group(key)
                    if key in seen:
                        group.problems.append(("duplicate", "the key appears twice in the shard"))
                    seen.add(key)
                if unsafe_name(info.name):  # a filtered shard would write it on, a tar tool extract it out
                    group.problems.append(("unsafe name", f"member {info.name!r} is absolute or has a '..' part"))
                _add_member(group, tar, info, ext, caption_extension, check_images)
            broken = _archive_end(tar)
        except (tarfile.TarError, OSError) as exc:
            broken = f"truncated or corrupt ({first_line(exc)})"
    if broken:  # the sample being read when the shard broke off may have lost members: it is left out
        yield Rejected(group.key if group else None, "truncated",
                       f"the shard breaks off {'in this sample' if group else 'before its first sample'}: {broken}")
    elif group is not None:
        yield group.finish(caption_extension)


class ShardPairs(Dataset):
    """Image-caption pairs from webdataset tar shards, indexed once (see the module docstring).

    Args:
        shards: the ``.tar`` files, in order; the index runs through them in that order, member order within.
        caption_extension: the caption member's extension (``txt``).
        with_images: serve images (the index checks image headers only when True).
        bad: what happens to bad samples (`BadSampleLog`).
    """

    def __init__(self, shards: Sequence[Path], caption_extension: str = "txt", with_images: bool = True,
                 bad: BadSampleLog | None = None) -> None:
        self.shards, self.with_images = [Path(p) for p in shards], with_images
        self.bad = bad if bad is not None else BadSampleLog()
        ext = caption_extension.lower().lstrip(".")
        keys, captions, shard_of, where = [], [], [], []
        for i, shard in enumerate(self.shards):
            for s in scan_shard(shard, ext, check_images=with_images):
                if isinstance(s, Rejected):
                    self.bad(shard, s.key, s.reason, s.detail)
                    continue
                keys.append(s.key)
                captions.append(s.caption)
                shard_of.append(i)
                where.append((s.image_offset, s.image_size))
        if not keys:
            raise ConfigError(f"{self.shards[0].parent}: no usable samples in {len(self.shards)} shard(s)")
        self.member_keys = PackedStrings(keys)
        self.keys = PackedStrings(unique_keys(keys, [self.shards[i].stem for i in shard_of]))
        self.prefixed = self.keys[0] != keys[0]  # unique_keys prefixed every key
        self.captions = PackedStrings(captions)
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.image_at = np.asarray(where, dtype=np.int64)

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.bad.entries

    def __len__(self) -> int:
        return len(self.captions)

    def text(self, index: int) -> str:
        return self.captions[index]

    def sample_key(self, index: int) -> str:
        """img2dataset's key (``00000001``); ``<shard stem>/<key>`` for every sample when keys repeat across
        shards."""
        return self.keys[index]

    def key_of(self, shard: Path, member_name: str) -> str | None:
        """The `sample_key` a member of ``shard`` belongs to (None: no sample's member): the rule a copy of the
        shards filtered by sample keys must use."""
        key = member_key(member_name)
        return f"{Path(shard).stem}/{key}" if key is not None and self.prefixed else key

    def location(self, index: int) -> tuple[Path, str]:
        """The shard file and the member key (`member_key` of its members) of sample ``index``."""
        return self.shards[int(self.shard_of[index])], self.member_keys[index]

    def image(self, index: int):
        shard, key = self.location(index)
        offset, size = (int(v) for v in self.image_at[index])
        with shard.open("rb") as f:  # opened per read: forked workers must not share a file position
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ConfigError(f"{shard}: sample {key}: the shard was truncated after it was indexed")
        return decode_image(data, f"{shard}: sample {key}")

    def __getitem__(self, index: int) -> dict:
        image = self.image(index) if self.with_images else None
        return {"text": self.captions[index], "image": image, "index": index}


# ---------------------------------------------------------------------------
# writing shards (tests, benchmarks)
# ---------------------------------------------------------------------------


def write_shard(path: str | Path, samples: Sequence[tuple[str, Any, str]], image_format: str = "PNG") -> Path:
    """Write ``(key, image, caption)`` samples as one webdataset shard, as img2dataset lays them out
    (``key.png`` or ``key.jpg``, then ``key.txt``); ``image`` is a PIL image or encoded bytes. Atomic."""
    from lit_amdet.io import write_with

    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[image_format.upper()]

    def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, caption in samples:
                if not isinstance(image, bytes):
                    buf = io.BytesIO()
                    image.save(buf, format=image_format.upper())
                    image = buf.getvalue()
                member(tar, f"{key}.{ext}", image)
                member(tar, f"{key}.txt", caption.encode("utf-8"))

    return write_with(path, write)
