"""TextEncoderDataModule serves every source type, splits deterministically, and names bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lit_amdet import load_encoder
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.errors import ConfigError

CAPTIONS = [f"a red circle number {i}" for i in range(40)]


def _write_tables(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"caption": CAPTIONS, "other": range(40)})
    paths = {"csv": tmp_path / "t.csv", "json": tmp_path / "t.jsonl", "parquet": tmp_path / "t.parquet"}
    df.to_csv(paths["csv"], index=False)
    df.to_json(paths["json"], orient="records", lines=True)
    df.to_parquet(paths["parquet"])
    return paths


def test_text_file_source(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(CAPTIONS) + "\n\n")
    dm = TextEncoderDataModule(source=str(f), val_fraction=0.25, num_samples=None, batch_size=8)
    dm.setup("fit")
    assert len(dm.splits.train) == 30 and len(dm.splits.val) == 10
    assert sorted(dm.prompts("train") + dm.prompts("val")) == sorted(CAPTIONS)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["text"]) == 8 and batch["images"] is None


@pytest.mark.parametrize("kind", ["csv", "json", "parquet"])
def test_table_sources(tmp_path, kind):
    path = _write_tables(tmp_path)[kind]
    dm = TextEncoderDataModule(source=str(path), text_column="caption", val_fraction=0.1, num_samples=None)
    dm.setup("fit")
    assert sorted(dm.prompts("train") + dm.prompts("val")) == sorted(CAPTIONS)


def test_split_is_deterministic_by_seed(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(CAPTIONS))
    a = TextEncoderDataModule(source=str(f), seed=1, num_samples=None).prompts("val")
    b = TextEncoderDataModule(source=str(f), seed=1, num_samples=None).prompts("val")
    c = TextEncoderDataModule(source=str(f), seed=2, num_samples=None).prompts("val")
    assert a == b and a != c


def test_image_folder_with_captions_file_tokenised_through_adapter(tmp_path, tiny_models):
    import pandas as pd

    (tmp_path / "img").mkdir()
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (20, 20), colour).save(tmp_path / "img" / f"{i}.png")
    pd.DataFrame({"file": [f"img/{i}.png" for i in range(4)],
                  "text": ["red", "green", "blue", "white"]}).to_csv(tmp_path / "pairs.csv", index=False)
    dm = TextEncoderDataModule(source=str(tmp_path / "pairs.csv"), image_column="file", val_fraction=0,
                               batch_size=4, max_length=16)
    adapter = load_encoder(tiny_models["clip"])
    dm.attach_encoder(adapter)
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].input_ids.shape == (4, 16)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_datasets_image_column(tmp_path, tiny_models):
    import datasets

    table = datasets.Dataset.from_dict(
        {"text": ["a", "b"], "image": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}),
    )
    table.to_parquet(str(tmp_path / "imgs.parquet"))
    dm = TextEncoderDataModule(source=str(tmp_path / "imgs.parquet"), image_column="image", val_fraction=0,
                               batch_size=2)
    dm.attach_encoder(load_encoder(tiny_models["siglip"]))
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["tokens"].input_ids.shape == (2, 64)  # SigLIP pads to its context


def test_world_source_with_views():
    dm = TextEncoderDataModule(source="world", num_samples=50, views=2, val_fraction=0.2, batch_size=5,
                               image_size=32)
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["images"]) == 5 and batch["images"][0].size == (32, 32)
    assert len(batch["views"]) == 5 and all(v[0] != t for v, t in zip(batch["views"], batch["text"]))


def test_world_long_captions_are_long():
    short = TextEncoderDataModule(num_samples=20, with_images=False).prompts("train")
    long = TextEncoderDataModule(num_samples=20, with_images=False, long_captions=3).prompts("train")
    assert sum(map(len, long)) > 2 * sum(map(len, short))


def test_bad_inputs_name_file_and_row(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.txt: no prompts"):
        TextEncoderDataModule(source=str(empty)).setup("fit")
    with pytest.raises(ConfigError, match="no such file"):
        TextEncoderDataModule(source=str(tmp_path / "missing.txt")).setup("fit")
    csv = _write_tables(tmp_path)["csv"]
    with pytest.raises(ConfigError, match=r"t.csv: no column 'text' \(columns: caption, other\)"):
        TextEncoderDataModule(source=str(csv)).setup("fit")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text("\n".join(json.dumps({"text": t}) for t in ["ok", " ", "fine"]))
    with pytest.raises(ConfigError, match="rows.jsonl: row 1: empty"):
        TextEncoderDataModule(source=str(bad_rows)).setup("fit")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    import pandas as pd

    pd.DataFrame({"image": ["broken.png"], "text": ["x"]}).to_csv(tmp_path / "imgs.csv", index=False)
    dm = TextEncoderDataModule(source=str(tmp_path / "imgs.csv"), image_column="image", val_fraction=0)
    with pytest.raises(ConfigError, match=r"imgs.csv: row 0: unreadable image .*broken.png"):
        next(iter(dm.train_dataloader()))


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(ConfigError, match="not loadable as a datasets hub name"):
        TextEncoderDataModule(source="no-such-org/no-such-dataset-xyz").setup("fit")
