"""A poisoned image-caption folder from the built-in world, to test data scans end to end.

`write_poisoned_world` renders world pairs through `PoisonedPairs` into
``images/*.png`` + ``captions.csv`` (columns ``image``, ``text``) +
``poison_labels.json``, which `TextEncoderDataModule(source=".../captions.csv",
image_column="image")` and ``lit-amdet scan_data --labels`` read back. With
``shard_size`` it writes webdataset shards instead (``shards/00000.tar`` ...,
img2dataset's layout: ``key.png`` + ``key.txt``, keys in pair order, so the
labels' indices are the data module's), read back through
``source=".../shards/{00000..NNNNN}.tar"``.

From Python, or from a config::

    python -m lit_amdet.datamodules.poisoned --out_dir data/badnets --num_samples 5000 \\
        --attack lit_amdet.poisoning.BadNets --rate 0.01
"""

from __future__ import annotations

import csv
from pathlib import Path

from lit_amdet.errors import ConfigError
from lit_amdet.io import write_with
from lit_amdet.poisoning import ImageTrigger, PoisonedPairs

CAPTIONS = "captions.csv"
LABELS = "poison_labels.json"


def write_poisoned_world(
    out_dir: str | Path,
    num_samples: int,
    attack: ImageTrigger,
    rate: float,
    target_caption: str = "banana",
    seed: int = 0,
    image_size: int = 32,
    shard_size: int | None = None,
) -> Path:
    """Write ``num_samples`` world pairs, a ``rate`` fraction of them poisoned; returns the ``captions.csv`` path,
    or with ``shard_size`` the shards' brace pattern (as a path).

    Args:
        out_dir: folder to write (created; existing files of the same names are replaced).
        num_samples: number of pairs.
        attack: image trigger applied to the poisoned images.
        rate: fraction of pairs to poison (at least one when > 0).
        target_caption: caption of every poisoned pair.
        seed: seed of the world and of the poisoned-index draw.
        image_size: side of the rendered images in pixels.
        shard_size: pairs per webdataset shard; None writes a folder of PNGs and a table instead.
    """
    from lit_amdet.world import World

    if num_samples < 1:
        raise ConfigError(f"num_samples must be positive (got {num_samples})")
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"rate must be in [0, 1] (got {rate})")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"shard_size must be positive (got {shard_size})")
    out = Path(out_dir)
    world = World(seed=seed, image_size=image_size, num_samples=num_samples)
    pairs = PoisonedPairs(world, attack, rate, target_caption=target_caption, seed=seed)
    if shard_size is not None:
        pattern = write_pair_shards(out / "shards", pairs, shard_size)
        pairs.save_labels(out / LABELS)
        return pattern
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(pairs)):
        sample = pairs[i]
        name = f"images/{i:06d}.png"
        sample.image.save(out / name)
        rows.append((name, sample.caption))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "text"])
            writer.writerows(rows)

    path = write_with(out / CAPTIONS, write)  # a reader never sees a half-written table
    pairs.save_labels(out / LABELS)
    return path


def write_pair_shards(out_dir: Path, pairs, shard_size: int) -> Path:
    """``pairs`` (items with ``.image`` and ``.caption``) as shards of ``shard_size``, keys ``%09d`` of the pair
    index; returns the brace pattern. Each shard is written atomically, one at a time (memory: one shard)."""
    from lit_amdet.datamodules.shards import numbered_pattern, write_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    count = -(-len(pairs) // shard_size)
    for s in range(count):
        span = range(s * shard_size, min(len(pairs), (s + 1) * shard_size))
        write_shard(out_dir / f"{s:05d}.tar", [(f"{i:09d}", (p := pairs[i]).image, p.caption) for i in span])
    return numbered_pattern(out_dir, count)


if __name__ == "__main__":
    from jsonargparse import CLI

    print(CLI(write_poisoned_world, as_positional=False))
