"""The end product of a data scan: a cut at a removal budget, keep/flagged key lists, filtered shards.

A scan ranks every pair by one detector's score; cleaning a training set means
removing a fixed budget of the most anomalous pairs (the paper's setting: "remove
the top 1 %"), because a score threshold means nothing across models and data
sets while a budget is what a team can afford to lose. `parse_budget` reads the
budget (a fraction or a count), `flag_top` picks the pairs, `cut_report` says
what the cut did (poisons removed, clean pairs lost, when labels are known),
`write_key_lists` writes ``keep.txt``/``flagged.txt`` and `write_filtered_shards`
copies webdataset tar shards without the flagged samples, streaming each shard
member by member (never extracted to disk). Plain numpy and stdlib, no Lightning.
"""

from __future__ import annotations

import math
import tarfile
import zlib
from collections.abc import Callable, Collection, Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lit_amdet.errors import ConfigError, LitAmdetError, first_line
from lit_amdet.io import write_text, write_with
from lit_amdet.metrics import budget_metrics, ranks

KEEP = "keep.txt"
FLAGGED = "flagged.txt"
SHARDS = "shards"
#: the budget of the removed/lost figures every labelled scan reports for every detector
REPORT_BUDGET = 0.01
# Shards are read and written with the compression their file name says, so the copy keeps its name honest.
_COMPRESSION = {".gz": "gz", ".tgz": "gz", ".bz2": "bz2", ".xz": "xz"}


def parse_budget(budget: float | int, n: int) -> int:
    """How many of ``n`` samples a budget removes: a float in (0, 1) is a fraction (rounded up, so a small
    fraction of a small set still removes one), an int >= 1 (or an integral float such as 10.0, as a config may
    spell it) is a count. Zero, negatives, non-integral floats >= 1, and budgets that remove every sample are a
    one-line `ConfigError`: a cut that removes nothing or everything is a mistake, not a choice."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ConfigError(f"budget must be a fraction in (0, 1) or a count >= 1, not {budget!r}")
    if isinstance(budget, float) and 0 < budget < 1:
        count = math.ceil(budget * n)
    elif budget >= 1 and float(budget).is_integer():
        count = int(budget)
    else:
        raise ConfigError(f"budget must be a fraction in (0, 1) or a whole count >= 1, not {budget!r}")
    if count >= n:
        raise ConfigError(f"budget {budget!r} removes {count} of {n} samples: it must leave some")
    return count


def flag_top(scores: np.ndarray, budget: float | int) -> np.ndarray:
    """Boolean mask of the `parse_budget` count of highest ``scores`` (higher = more anomalous).

    Ties at the cut go to the lower index, as in `lit_amdet.metrics.ranks`: the flagged set is exactly the
    rows whose rank in ``scores.csv`` is within the count, whatever the hardware. NaN scores are refused (they
    have no place in a ranking); +inf ranks first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a vector, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise LitAmdetError(f"{int(np.isnan(scores).sum())} NaN score(s): cannot rank the samples for a cut")
    return ranks(scores) <= parse_budget(budget, len(scores))


def cut_report(scores: np.ndarray, flagged: np.ndarray, detector: str, budget: float | int,
               labels: np.ndarray | None) -> dict[str, Any]:
    """The report's ``cut`` block: the detector and budget, how many samples were flagged, the score threshold
    (the lowest flagged score; ``tied_unflagged`` samples share it and were kept by the index tie-break), and
    with labels the `budget_metrics`."""
    threshold = float(scores[flagged].min())
    return {"detector": detector, "budget": budget, "flagged": int(flagged.sum()), "num_samples": len(scores),
            "threshold": threshold, "tied_unflagged": int((scores[~flagged] == threshold).sum()),
            "metrics": budget_metrics(flagged, labels) if labels is not None else None}


def metrics_at_budget(scores: dict[str, np.ndarray], labels: np.ndarray,
                      budget: float | int = REPORT_BUDGET) -> dict[str, dict]:
    """`budget_metrics` of every detector's own top-``budget`` cut: the removed/lost columns of the benchmark
    table, so detectors compare at the budget a user would remove, not only by ROC-AUC."""
    return {d: budget_metrics(flag_top(s, budget), labels) for d, s in scores.items()}


def check_cut(budget: float | int | None, cut_by: str, detectors: Sequence[str], n: int | None,
              keys: Sequence[str] | None = None) -> None:
    """Refuse a cut that cannot be made, before any scoring (an embedding pass can take hours): ``cut_by`` not
    among the ``detectors`` run, a budget `parse_budget` refuses for ``n`` samples (None: not known yet), or
    sample ``keys`` that cannot name each sample once a line (a line break in one; one key for two samples, which
    could then be both kept and flagged)."""
    if budget is None:
        return
    if cut_by not in detectors:
        raise ConfigError(f"cut_by {cut_by!r} is not among the detectors run ({', '.join(detectors)})")
    if n is not None:
        parse_budget(budget, n)
    if keys is not None:
        broken = next((k for k in keys if "\n" in k or "\r" in k), None)
        if broken is not None:
            raise ConfigError(f"sample key {broken!r} holds a line break; keep.txt cannot list it")
        seen: set[str] = set()
        twice = next((k for k in keys if k in seen or seen.add(k)), None)
        if twice is not None:
            raise ConfigError(f"sample key {twice!r} names two samples; keep.txt could not tell them apart")


def apply_cut(scores: dict[str, np.ndarray], cut_by: str, budget: float | int, labels: np.ndarray | None,
              keys: Sequence[str], out_dir: str | Path, indices: np.ndarray | None = None,
              write_shards: Callable[[np.ndarray], dict] | None = None) -> dict[str, Any]:
    """Flag ``cut_by``'s top ``budget``, write ``keep.txt``/``flagged.txt`` and, with ``write_shards``, the
    filtered shards (it is given the kept samples' data-set ``indices``, default the row numbers); the report's
    ``cut`` block."""
    flagged = flag_top(scores[cut_by], budget)
    block = cut_report(scores[cut_by], flagged, cut_by, budget, labels)
    write_key_lists(out_dir, keys, flagged)
    block["files"] = [KEEP, FLAGGED]
    if write_shards is not None:
        rows = np.flatnonzero(~flagged)
        block["shards"] = write_shards(rows if indices is None else np.asarray(indices)[rows])
        block["files"].append(f"{SHARDS}/")
    return block


def cut_line(block: dict[str, Any], out_dir: Path) -> str:
    """One line a person reads about the cut."""
    line = (f"cut by {block['detector']} at budget {block['budget']}: {block['flagged']} of "
            f"{block['num_samples']} flagged (lowest flagged score {block['threshold']:.4g})")
    m = block["metrics"]
    if m is not None:
        line += f", {m['poisons_removed']} of {m['poisons']} poisons removed, {m['clean_lost']} clean pairs lost"
    shards = block.get("shards")
    if shards is not None:
        line += f"; {shards['samples_kept']} samples kept in {shards['shards']} shard(s)"
        if shards["keep_keys_not_found"]:
            line += f" (WARNING: {shards['keep_keys_not_found']} kept keys in no shard)"
        if shards["bad_shards"]:
            line += f" ({len(shards['bad_shards'])} bad shard(s) cut short or left out: see report.json)"
    return line + f"; {Path(out_dir) / KEEP}, {FLAGGED}"


# ---------------------------------------------------------------------------
# keep.txt / flagged.txt
# ---------------------------------------------------------------------------


def write_key_lists(out_dir: str | Path, keys: Sequence[str], flagged: np.ndarray) -> tuple[Path, Path]:
    """``keep.txt`` and ``flagged.txt`` under ``out_dir``: one sample key a line, in data-set order.

    Everything is checked before either file is written, and each is written atomically, so an error leaves
    no partial list. A key with a line break could not be read back one a line and is refused.
    """
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.shape != (len(keys),):
        raise ValueError(f"{len(keys)} keys but a flag mask of shape {flagged.shape}")
    keys = [str(k) for k in keys]
    bad = next((k for k in keys if "\n" in k or "\r" in k), None)
    if bad is not None:
        raise LitAmdetError(f"sample key {bad!r} holds a line break; cannot write it one key a line")
    out = Path(out_dir)
    keep_path = write_text(out / KEEP, _lines(k for k, f in zip(keys, flagged) if not f))
    flagged_path = write_text(out / FLAGGED, _lines(k for k, f in zip(keys, flagged) if f))
    return keep_path, flagged_path


def _lines(keys) -> str:
    return "".join(f"{k}\n" for k in keys)


def read_keys(path: str | Path) -> list[str]:
    """The keys of a `write_key_lists` file, in order (split at line feeds only: a key may hold other breaks
    that ``str.splitlines`` would split at)."""
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


# ---------------------------------------------------------------------------
# filtered webdataset shards
# ---------------------------------------------------------------------------


def write_filtered_shards(shards: Sequence[str | Path], keep_keys: Collection[Hashable], out_dir: str | Path,
                          key_of: Callable[[Path, str], Hashable | None],
                          bad_shards: Literal["fail", "skip"] = "fail") -> dict[str, Any]:
    """Copy each tar shard to ``out_dir/shards/<same name>`` with only the members of kept samples.

    ``key_of(shard, member_name)`` is the sample a member belongs to, in the terms of ``keep_keys`` (None: no
    sample's member, dropped); the shard is passed because a set whose keys repeat across shards needs it.
    Members are streamed from the source tar into the copy (header and bytes, never extracted to disk);
    non-regular members (folders, links) are skipped. A member whose key is not kept is dropped, so a sample the
    scan never saw (a bad one the data module skipped) is not kept unvetted. Each shard is written atomically.
    A shard that is unreadable or breaks off (truncated, corrupt header) is a one-line `LitAmdetError` naming
    it and the last member read; with ``bad_shards="skip"`` (the data module skipped bad samples too) its copy
    holds the kept members before the break (an unopenable one gets none) and it is listed in ``bad_shards``,
    unless the break falls inside a kept member, which is always an error. Returns counts, with
    ``keep_keys_not_found``: kept keys no shard held (non-zero: ``key_of`` and the scan's keys disagree, or a
    shard is missing).
    """
    sources = [Path(s) for s in shards]
    target = Path(out_dir) / SHARDS
    _check_shard_names(sources, target)
    keep = set(keep_keys)
    totals: dict[str, Any] = {"shards": len(sources), "samples_kept": 0, "samples_dropped": 0, "members_kept": 0,
                              "members_dropped": 0, "members_skipped": 0, "bad_shards": []}
    found: set[Hashable] = set()
    for src in sources:
        copied = Copy(src, keep, key_of, bad_shards)
        write_with(target / src.name, copied.write)
        if copied.problem is not None:
            totals["bad_shards"].append({"shard": str(src), "problem": copied.problem})
        found |= copied.kept
        for name, value in copied.counts().items():
            totals[name] += value
    totals["keep_keys_not_found"] = len(keep - found)
    return totals


def _check_shard_names(sources: Sequence[Path], target: Path) -> None:
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"shards named {repeated[0]!r} in more than one folder: the filtered copies would "
                          "overwrite each other")
    clash = next((s for s in sources if (target / s.name).resolve() == s.resolve()), None)
    if clash is not None:
        raise ConfigError(f"{clash}: the filtered copy would overwrite its own source; choose another output_dir")


class Copy:
    """One shard's filtered copy: `write` streams ``src`` into a new tar keeping the regular members whose key
    is in ``keep``; afterwards ``kept``/``dropped`` hold the keys seen and ``problem`` why the source broke off
    (None: it ended cleanly)."""

    def __init__(self, src: Path, keep: set, key_of: Callable[[Path, str], Hashable | None],
                 bad_shards: Literal["fail", "skip"] = "fail") -> None:
        self.src, self.keep, self.key_of, self.bad_shards = src, keep, key_of, bad_shards
        self.kept: set = set()
        self.dropped: set = set()
        self.members = {"members_kept": 0, "members_dropped": 0, "members_skipped": 0}
        self.last = "(none)"
        self.problem: str | None = None

    def counts(self) -> dict[str, int]:
        return {**self.members, "samples_kept": len(self.kept), "samples_dropped": len(self.dropped - self.kept)}

    def write(self, dst: Path) -> None:
        compression = _COMPRESSION.get(self.src.suffix, "")
        with tarfile.open(dst, f"w:{compression}") as tout:  # closed cleanly (end blocks) even after a break
            try:
                with tarfile.open(self.src, f"r|{compression}") as tin:
                    self._members(tin, tout)
                    if not compression:
                        _check_end(self.src, tin.offset)
            except _BROKEN as exc:
                self._broke(exc)

    def _members(self, tin: tarfile.TarFile, tout: tarfile.TarFile) -> None:
        current, ended = None, set()  # the key being read; keys whose run of members has ended
        for member in tin:  # stream mode: each member's bytes are read before the next header
            key = self.key_of(self.src, member.name) if member.isreg() and not member.issparse() else None
            if key is not None and key != current:
                ended.add(current)
                current = None if key in ended else key
            # links, devices and sparse members are never copied; nor is a key that comes back after its run
            # ended: the data module indexed only its first run (the rest was a "duplicate"), so the scan never saw it
            if not member.isreg() or member.issparse() or (key is not None and key != current):
                self.members["members_skipped"] += 1
                continue
            self.last = member.name
            if key is None or key not in self.keep:
                self.dropped.add(key)
                self.members["members_dropped"] += 1
                continue
            try:
                tout.addfile(member, tin.extractfile(member))
            except _BROKEN as exc:  # the copy holds half a kept member: never a usable shard
                raise LitAmdetError(f"{self.src}: breaks off inside kept member {member.name!r} "
                                    f"({first_line(exc)})") from None
            self.kept.add(key)
            self.members["members_kept"] += 1

    def _broke(self, exc: BaseException) -> None:
        self.problem = f"after member {self.last!r}: {first_line(exc)}"
        if self.bad_shards != "skip":
            raise LitAmdetError(f"{self.src}: shard copy failed {self.problem}") from None


# what a truncated or corrupt source raises while it is read
_BROKEN = (tarfile.TarError, EOFError, zlib.error, OSError)


def _check_end(src: Path, offset: int) -> None:
    # tarfile ends a read quietly at a truncated header; a complete archive ends with a zero block there.
    with src.open("rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {offset} (truncated?)")


def sample_keys(datamodule, indices: Sequence[int]) -> list[str] | None:
    """Each row's sample key from the data module (a shard's own key), None where it has no keys (indices)."""
    key = getattr(datamodule, "sample_key", None)
    return [str(key(i)) for i in indices] if callable(key) else None


def shard_writer(datamodule, budget: float | int | None, output_dir: str):
    """``write_shards``' writer of the filtered shards (`lit_amdet.cleaning.write_filtered_shards`), checked
    before the embedding pass: it needs a cut and shard input. A kept sample is named by its shard and member
    key (`ShardPairs.location`), which holds also where keys repeat across shards; shards the data module
    skipped bad samples of (``bad_samples: skip``) are copied up to where they break off."""
    if budget is None:
        raise ConfigError("write_shards needs a budget (--budget 0.01: remove the top 1 %)")
    shards = list(getattr(datamodule, "shard_paths", None) or [])
    if not shards:
        raise ConfigError("write_shards needs webdataset shard input (data.source: shards/{00000..00009}.tar)")
    from lit_amdet.datamodules.shards import member_key  # the data module's own member-name -> key rule

    bad = getattr(datamodule.hparams, "bad_samples", "fail")

    def write(kept_indices) -> dict:
        locate = datamodule.dataset.location
        keep = {(Path(shard), key) for shard, key in map(locate, kept_indices.tolist())}
        def key_of(shard: Path, name: str):
            key = member_key(name)
            return None if key is None else (shard, key)

        return write_filtered_shards(shards, keep, output_dir, key_of, bad_shards=bad)

    return write
