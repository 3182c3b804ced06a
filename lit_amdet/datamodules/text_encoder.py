"""`TextEncoderDataModule`: the one DataModule that pretraining, injection, fine-tuning and detection use.

Sources (``source``):
- ``"world"`` (default): the built-in synthetic image-caption world, streamed;
- a ``.txt`` file: one prompt per line;
- webdataset ``.tar`` shards: one, a brace pattern (``data/{00000..00331}.tar``) or a
  folder of them (`lit_amdet.datamodules.shards.ShardPairs`);
- ``.parquet`` / ``.arrow`` tables (one, a pattern, a folder, a ``datasets.save_to_disk``
  folder), read in place with pyarrow (`lit_amdet.datamodules.tables.ColumnPairs`):
  ``text_column``, and an ``image_column`` of bytes, ``datasets`` image structs or file names;
- a ``.csv`` / ``.json`` / ``.jsonl`` file, read through ``datasets``
  (``text_column``; with ``image_column`` it holds image file names relative to
  ``image_root``, or a ``datasets`` image column);
- anything else: a ``datasets`` hub name (needs network).

Bad samples of shards and tables (truncated shard, missing or empty caption, no or
undecodable image, unreadable file) fail with one line naming the shard and the key,
or with ``bad_samples: skip`` are left out and listed in `TextEncoderDataModule.skipped`.

Items are dicts ``{"text", "image" (PIL or None), "index", "views" (paraphrases,
world only)}``. Once a LightningModule attaches its encoder (``attach_encoder``),
batches are tokenised and images transformed through that encoder's adapter,
so the same data serves every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_amdet.datamodules.shards import BadSampleLog, ShardPairs, SourceFiles, resolve_source
from lit_amdet.datamodules.tables import ColumnPairs, image_value
from lit_amdet.errors import ConfigError, first_line, missing_hint

TEXT_SUFFIXES = {".txt"}
TABLE_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json"}


class WorldPairs(Dataset):
    """The world as a dataset of ``num_samples`` image-caption pairs (rendered on access)."""

    def __init__(self, seed: int, num_samples: int, image_size: int, with_images: bool, views: int,
                 long_captions: int = 1) -> None:
        from lit_amdet.world import World

        self.world = World(seed=seed, image_size=image_size, num_samples=max(num_samples, 1))
        self.num_samples, self.with_images, self.views = num_samples, with_images, views
        self.long_captions = long_captions

    def __len__(self) -> int:
        return self.num_samples

    def text(self, index: int) -> str:
        if self.long_captions > 1:
            # several true descriptions of one scene in a row: long prompts for long-context encoders
            return " ".join(self.world.caption_views(index, n_views=self.long_captions))
        return self.world.caption(index)

    def __getitem__(self, index: int) -> dict:
        item = {"text": self.text(index), "image": None, "index": index}
        if self.with_images:
            item["image"] = self.world.render(self.world.scene(index))
        if self.views > 1:
            item["views"] = self.world.caption_views(index, n_views=self.views)[1:]
        return item


class TextLines(Dataset):
    """Prompts from a text file, one per line (blank lines skipped)."""

    def __init__(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
        self.texts = [ln.strip() for ln in lines if ln.strip()]
        if not self.texts:
            raise ConfigError(f"{path}: no prompts (the file is empty)")

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, index: int) -> str:
        return self.texts[index]

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index], "image": None, "index": index}


class TablePairs(Dataset):
    """Rows of a ``datasets`` table: a caption column and, optionally, an image column."""

    def __init__(self, table, where: str, text_column: str, image_column: str | None,
                 image_root: Path | None) -> None:
        missing = [c for c in (text_column, image_column) if c and c not in table.column_names]
        if missing:
            raise ConfigError(f"{where}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
        if len(table) == 0:
            raise ConfigError(f"{where}: no rows")
        texts = table[text_column]
        for row, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ConfigError(f"{where}: row {row}: empty or non-text value in column {text_column!r}")
        self.texts = [t.strip() for t in texts]
        self.table, self.where = table, where
        self.image_column, self.image_root = image_column, image_root

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, index: int) -> str:
        return self.texts[index]

    def image(self, index: int):
        return image_value(self.table[index][self.image_column], f"{self.where}: row {index}", self.image_root)

    def sample_key(self, index: int) -> str:
        """The ``key`` column's value, else the image file name, else the row number."""
        row = self.table[index]
        value = row.get("key")
        if value is None and self.image_column and isinstance(row.get(self.image_column), str):
            value = row[self.image_column]
        return str(value) if value not in (None, "") else str(index)

    def __getitem__(self, index: int) -> dict:
        image = self.image(index) if self.image_column else None
        return {"text": self.texts[index], "image": image, "index": index}


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Deterministic split by seed: a fixed permutation cut into train / val / test."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction + test_fraction must be below 1 (got {val_fraction}, {test_fraction})")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if val_fraction else 0
    n_test = int(round(n * test_fraction)) if test_fraction else 0
    if val_fraction and n_val == 0 and n > 1:
        n_val = 1
    return Splits(np.sort(order[n_val + n_test:]), np.sort(order[:n_val]), np.sort(order[n_val:n_val + n_test]))


class _Subset(Dataset):
    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.indices[i])]


class TextEncoderDataModule(LightningDataModule):
    """Prompts (and images) for every task, tokenised through the attached encoder adapter.

    Args:
        source: ``"world"``, a prompt/caption file, webdataset shards (a ``.tar``, a brace pattern, a folder),
            parquet/arrow tables, or a ``datasets`` hub name (see the module docstring).
        text_column: caption column of a table source.
        image_column: image column (file names or a ``datasets`` image feature), if any.
        image_root: folder the image file names are relative to (default: the table's folder).
        num_samples: how many world pairs to use (world only); caps other sources if set.
        with_images: serve images (default: whenever the source has them).
        views: number of caption views per item (>1: paraphrases, for text-only contrastive training).
        long_captions: world only: join this many true captions of one scene into one prompt.
        max_length: tokenise to at most this many positions (families that pad to their context ignore it).
        val_fraction / test_fraction / seed: the deterministic split.
        world_seed / image_size: the world's seed and image resolution.
        hub_split: split name for a hub data set.
        bad_samples: shards and parquet/arrow tables: ``fail`` on a bad sample (one line naming the shard and
            the key) or ``skip`` it (listed in `skipped`).
        caption_extension: shards: the extension of the caption member (img2dataset: ``txt``).
    """

    def __init__(
        self,
        source: str = "world",
        text_column: str = "text",
        image_column: str | None = None,
        image_root: str | None = None,
        num_samples: int | None = 20000,
        with_images: bool | None = None,
        views: int = 1,
        long_captions: int = 1,
        max_length: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        seed: int = 0,
        world_seed: int = 0,
        image_size: int = 64,
        hub_split: str = "train",
        bad_samples: Literal["fail", "skip"] = "fail",
        caption_extension: str = "txt",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = None
        self._dataset: Dataset | None = None
        self._splits: Splits | None = None
        BadSampleLog(bad_samples)  # an unknown mode is refused now, not after indexing
        self._files: SourceFiles | None = None
        self._check_source()

    def _check_source(self) -> None:
        """A missing local file is refused when the DataModule is built, before the Trainer writes anything."""
        if self.hparams.source != "world":
            self._files = resolve_source(self.hparams.source)
        if self._files is not None:
            return
        path = Path(self.hparams.source).expanduser()
        if self.hparams.source != "world" and (path.suffix in TEXT_SUFFIXES or path.suffix in TABLE_SUFFIXES
                                               or path.exists()) and not path.is_file():
            raise ConfigError(f"{path}: no such file{missing_hint(path)}")

    # ----- building the data set -------------------------------------------------
    def _build(self) -> Dataset:
        hp = self.hparams
        if hp.views < 1 or hp.long_captions < 1:
            raise ConfigError("views and long_captions must be at least 1")
        if hp.batch_size < 1 or (hp.eval_batch_size is not None and hp.eval_batch_size < 1):
            raise ConfigError(f"batch_size and eval_batch_size must be at least 1 (got {hp.batch_size}, "
                              f"{hp.eval_batch_size})")
        if hp.source == "world":
            n = hp.num_samples or 20000
            with_images = True if hp.with_images is None else hp.with_images
            return WorldPairs(hp.world_seed, n, hp.image_size, with_images, hp.views, hp.long_captions)
        if hp.views > 1:
            raise ConfigError("views > 1 (paraphrases) is only available for the world source")
        self._check_source()
        if self._files is not None:
            return self._shards_or_tables(self._files)
        path = Path(hp.source).expanduser()
        if path.suffix in TEXT_SUFFIXES or path.suffix in TABLE_SUFFIXES or path.exists():
            if path.suffix in TEXT_SUFFIXES:
                return TextLines(path)
            if path.suffix not in TABLE_SUFFIXES:
                raise ConfigError(f"{path}: unsupported file type (use .txt, .csv, .json, .jsonl, .parquet, "
                                  ".arrow or .tar shards)")
            return self._table(path)
        return self._hub(hp.source)

    def _shards_or_tables(self, files: SourceFiles) -> Dataset:
        hp = self.hparams
        bad = BadSampleLog(hp.bad_samples)
        if files.kind == "tar":
            return ShardPairs(files.files, hp.caption_extension, hp.with_images is not False, bad)
        root = Path(hp.image_root) if hp.image_root else files.files[0].parent
        return ColumnPairs(files, hp.text_column, self._image_column(), root, bad)

    def _table(self, path: Path) -> TablePairs:
        import datasets

        hp = self.hparams
        try:
            table = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise ConfigError(f"{path}: cannot read as {path.suffix[1:]}: {first_line(exc)}") from exc
        root = Path(hp.image_root) if hp.image_root else path.parent
        return TablePairs(table, str(path), hp.text_column, self._image_column(), root)

    def _hub(self, name: str) -> TablePairs:
        import datasets

        hp = self.hparams
        try:
            table = datasets.load_dataset(name, split=hp.hub_split)
        except Exception as exc:
            raise ConfigError(f"{name}: not a file, and not loadable as a datasets hub name "
                              f"({first_line(exc)})") from exc
        return TablePairs(table, name, hp.text_column, self._image_column(), None)

    def _image_column(self) -> str | None:
        return None if self.hparams.with_images is False else self.hparams.image_column

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            n = len(self.dataset)
            if self.hparams.num_samples and self.hparams.source != "world":
                n = min(n, self.hparams.num_samples)
            self._splits = split_indices(n, self.hparams.val_fraction, self.hparams.test_fraction,
                                         self.hparams.seed)
        return self._splits

    @property
    def shard_paths(self) -> list[Path] | None:
        """The webdataset shard files in index order (None when the source is not shards)."""
        return list(self._files.files) if self._files is not None and self._files.kind == "tar" else None

    @property
    def skipped(self) -> list[dict]:
        """The bad samples left out (``bad_samples: skip``): ``{"shard", "key", "reason", "detail"}`` each
        (key None: a whole shard, file or row group)."""
        return list(getattr(self.dataset, "skipped", []))

    def sample_key(self, index: int) -> str:
        """The key of sample ``index``: a shard sample's webdataset key (``00000001``, or ``00003/00000001``
        for every sample when keys repeat across shards), a table's ``key`` column, image file name or row,
        else the index itself."""
        key = getattr(self.dataset, "sample_key", None)
        return key(index) if key is not None else str(index)

    def shard_key_of(self, shard: Path, member_name: str) -> str | None:
        """The `sample_key` of the sample a member of a webdataset ``shard`` belongs to (None: no sample's
        member); shard sources only."""
        if not isinstance(self.dataset, ShardPairs):
            raise ConfigError("shard_key_of needs webdataset shard input")
        return self.dataset.key_of(shard, member_name)

    @property
    def has_images(self) -> bool:
        ds = self.dataset
        return bool(getattr(ds, "with_images", False) or getattr(ds, "image_column", None))

    def setup(self, stage: str | None = None) -> None:
        _ = self.splits  # build and validate early: bad input fails before training starts

    def prompts(self, split: str = "train", limit: int | None = None) -> list[str]:
        """The captions of one split as plain text (no image is rendered)."""
        idx = getattr(self.splits, split)
        if limit is not None:
            idx = idx[:limit]
        return [self.dataset.text(int(i)) for i in idx]

    # ----- batches ---------------------------------------------------------------
    def attach_encoder(self, encoder) -> None:
        """Tokenise and transform through ``encoder`` (a `TextEncoderAdapter`) from now on."""
        self.encoder = encoder
        self._image_transform = encoder.image_transform() if (encoder.has_image_tower and self.has_images) else None

    def collate(self, items: Sequence[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "text": [it["text"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        images = [it["image"] for it in items if it["image"] is not None]
        views = [it["views"] for it in items if "views" in it]
        if self.encoder is None:
            batch["images"] = images or None
            if views:
                batch["views"] = views
            return batch
        max_length = self.hparams.max_length
        batch["tokens"] = self.encoder.tokenize(batch["text"], max_length=max_length)
        if images and self._image_transform is not None:
            batch["pixel_values"] = torch.stack([self._image_transform(im) for im in images])
        if views:
            batch["view_tokens"] = [self.encoder.tokenize([v[j] for v in views], max_length=max_length)
                                    for j in range(len(views[0]))]
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        size = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        subset = _Subset(self.dataset, getattr(self.splits, split))
        if len(subset) == 0:
            raise ConfigError(f"the {split} split is empty (check val_fraction / test_fraction / num_samples)")
        return DataLoader(subset, batch_size=size, shuffle=shuffle, num_workers=hp.num_workers,
                          collate_fn=self.collate, drop_last=shuffle and len(subset) > size,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Subset(self.dataset, np.arange(len(self.dataset))),
                          batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
                          num_workers=self.hparams.num_workers, collate_fn=self.collate)
