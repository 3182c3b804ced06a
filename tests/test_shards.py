"""Webdataset shards and parquet/arrow tables with image bytes: sources, keys and order, bad samples (fail or
skip, named by shard and key), unsafe members, and a `lit-amdet scan_data` run from tiny shards."""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile

import pytest
from PIL import Image

from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.datamodules.shards import expand_braces, member_key, split_member, write_shard
from lit_amdet.errors import ConfigError

PER_SHARD = 4


def colour(shard: int, i: int) -> tuple[int, int, int]:
    return (40 * i, 60 * shard, 7)


def samples(shard: int, n: int = PER_SHARD, first: int = 0) -> list[tuple[str, Image.Image, str]]:
    """img2dataset-style keys (``SSSSIIII``), a distinct colour and caption per sample."""
    return [(f"{shard:04d}{i:04d}", Image.new("RGB", (4, 4), colour(shard, i)), f"shard {shard} sample {i}")
            for i in range(first, first + n)]


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    for s in range(3):
        write_shard(folder / f"{s:05d}.tar", samples(s))
    return folder


def png(rgb=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), rgb).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def dm(source, **kw) -> TextEncoderDataModule:
    return TextEncoderDataModule(source=str(source), val_fraction=0, **kw)


def test_member_names_and_brace_patterns():
    assert split_member("00000001.jpg") == ("00000001", "jpg")
    assert split_member("sub/00000001.seg.JPG") == ("sub/00000001", "seg.jpg")
    assert member_key("00000001.txt") == "00000001" and member_key("README") is None
    assert member_key("._00000001.jpg") is None  # a macOS AppleDouble file belongs to no sample
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{08..10}") == ["08", "09", "10"] and expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("x{y}z") == ["x{y}z"] and expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("spec", ["{00000..00002}.tar", "", "{00000,00001,00002}.tar"])
def test_pattern_folder_keys_order_and_pixels(shards, spec):
    data = dm(shards / spec if spec else shards)
    assert len(data.dataset) == 3 * PER_SHARD and data.skipped == []
    assert data.shard_paths == [shards / f"{s:05d}.tar" for s in range(3)]
    assert data.prompts() == [f"shard {s} sample {i}" for s in range(3) for i in range(PER_SHARD)]
    assert [data.sample_key(i) for i in range(5)] == ["00000000", "00000001", "00000002", "00000003", "00010000"]
    item = data.dataset[PER_SHARD + 2]
    assert item["index"] == PER_SHARD + 2 and item["image"].getpixel((1, 1)) == colour(1, 2)
    assert data.has_images and data.dataset.location(PER_SHARD + 2) == (shards / "00001.tar", "00010002")


def test_a_folder_source_leaves_out_a_killed_writes_hidden_temporary(tmp_path):
    """`lit_amdet.io.write_with` writes ``.NAME.XXXX.tar`` beside the shard; killed midway, it stays there."""
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", samples(s))
    (tmp_path / ".00002.tar.k1ll3d.tar").write_bytes(b"half a shard")
    data = dm(tmp_path)
    assert data.shard_paths == [tmp_path / "00000.tar", tmp_path / "00001.tar"] and data.skipped == []


def test_one_shard_and_a_pattern_with_a_missing_file(shards):
    assert len(dm(shards / "00001.tar").dataset) == PER_SHARD
    with pytest.raises(ConfigError, match=r"2 of its 5 files do not exist \(the first: .*00003.tar\)"):
        dm(shards / "{00000..00004}.tar")
    assert dm("world").shard_paths is None and dm("world").sample_key(3) == "3"


def test_keys_repeated_across_shards_carry_the_shard_stem(tmp_path):
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", samples(0, n=2))  # the same keys in both shards
    data = dm(tmp_path)
    assert [data.sample_key(i) for i in range(4)] == ["00000/00000000", "00000/00000001",
                                                      "00001/00000000", "00001/00000001"]
    assert data.dataset.location(3) == (tmp_path / "00001.tar", "00000001")
    assert data.shard_key_of(tmp_path / "00001.tar", "00000001.png") == "00001/00000001"
    assert dm(tmp_path / "00000.tar").shard_key_of(tmp_path / "00000.tar", "00000001.png") == "00000001"


def test_parquet_with_image_bytes_keys_and_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    table = pa.table({"key": [f"k{i}" for i in range(5)], "caption": [f"c{i}" for i in range(5)],
                      "jpg": [png(c) for c in colours]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)  # three row groups
    data = dm(tmp_path / "t.parquet", text_column="caption", image_column="jpg")
    assert data.prompts() == [f"c{i}" for i in range(5)] and data.sample_key(4) == "k4"
    assert [data.dataset[i]["image"].getpixel((0, 0)) for i in (4, 0, 3)] == [colours[4], colours[0], colours[3]]
    pq.write_table(table.drop_columns(["key"]), tmp_path / "nokey.parquet")
    assert dm(tmp_path / "nokey.parquet", text_column="caption", image_column="jpg").sample_key(2) == "2"


def test_datasets_image_column_as_arrow_and_save_to_disk(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict(
        {"text": ["red", "blue"], "image": [Image.new("RGB", (5, 5), "red"), Image.new("RGB", (5, 5), "blue")]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}))
    table.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "saved", next((tmp_path / "saved").glob("*.arrow"))):
        data = dm(source, image_column="image")
        assert data.prompts() == ["red", "blue"] and data.sample_key(1) == "1"
        assert data.dataset[1]["image"].getpixel((2, 2)) == (0, 0, 255)


def truncated(shards, member: str):
    """Shard 1 cut in the middle of ``member``'s data (the members after it are lost too)."""
    path = shards / "00001.tar"
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[:info.offset_data + info.size // 2])
    return path


def test_truncated_shard_fails_naming_shard_and_key(shards):
    path = truncated(shards, "00010002.png")
    with pytest.raises(ConfigError) as info:
        dm(shards).setup()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: sample 00010002: the shard breaks off")


def test_truncated_shard_skipped_and_counted(shards):
    path = truncated(shards, "00010002.png")
    data = dm(shards, bad_samples="skip")
    assert len(data.dataset) == 3 * PER_SHARD - 2  # sample 2 broke off, sample 3 is gone with it
    assert [(s["shard"], s["key"], s["reason"]) for s in data.skipped] == [(str(path), "00010002", "truncated")]
    assert data.sample_key(PER_SHARD + 2) == "00020000"  # the next shard follows on


@pytest.mark.parametrize(("where", "detail"), [("boundary", "no end-of-archive block"),
                                               ("header", "no end-of-archive block"),
                                               ("garbage", "corrupt member header")])
def test_shards_that_stop_at_a_header_are_caught(tmp_path, where, detail):
    """tarfile ends quietly at a truncated or garbled header: the missing end-of-archive block gives it away."""
    path = write_shard(tmp_path / "00000.tar", samples(0))
    with tarfile.open(path) as tar:
        at = tar.getmember("00000002.png").offset  # the header of sample 2's first member
    raw = path.read_bytes()
    path.write_bytes({"boundary": raw[:at], "header": raw[:at + 100],
                      "garbage": raw[:at] + b"x" * 512 + raw[at + 512:]}[where])
    data = dm(path, bad_samples="skip")
    assert len(data.dataset) == 1 and data.skipped[0]["key"] == "00000001" and detail in data.skipped[0]["detail"]


def test_bad_samples_fail_or_skip_with_reasons(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", png()), add(tar, "a.txt", b"fine")
        add(tar, "b.png", png())  # no caption
        add(tar, "c.txt", b"no image")
        add(tar, "d.jpg", b"not an image"), add(tar, "d.txt", b"junk image")
        add(tar, "e.png", png()), add(tar, "e.txt", b"  \n")  # empty caption
        add(tar, "f.png", png()), add(tar, "f.txt", b"\xff\xfe")  # not UTF-8
        add(tar, "g.png", png()), add(tar, "g.txt", b"fine too")
    data = dm(path, bad_samples="skip")
    assert data.prompts() == ["fine", "fine too"] and [data.sample_key(i) for i in (0, 1)] == ["a", "g"]
    assert [(s["key"], s["reason"]) for s in data.skipped] == [
        ("b", "no caption"), ("c", "no image"), ("d", "bad image"), ("e", "bad caption"), ("f", "bad caption")]
    with pytest.raises(ConfigError, match=r"00000.tar: sample b: no caption member \(.txt\)"):
        dm(path).setup()
    with pytest.raises(ConfigError, match="bad_samples must be"):
        dm(path, bad_samples="ignore")


def test_links_are_not_followed_and_pickles_never_read(tmp_path):
    path = tmp_path / "00000.tar"
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(type("Boom", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})())
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", kind=tarfile.SYMTYPE, link="/etc/passwd"), add(tar, "a.txt", b"linked image")
        add(tar, "b.png", png()), add(tar, "b.txt", b"fine"), add(tar, "b.pyd", payload)
        add(tar, "b.json", kind=tarfile.LNKTYPE, link="a.txt")
        add(tar, "c.png", kind=tarfile.CHRTYPE), add(tar, "c.txt", b"device")
    data = dm(path, bad_samples="skip")
    assert data.prompts() == ["fine"] and not marker.exists()
    assert [(s["key"], s["reason"]) for s in data.skipped] == [("a", "no image"), ("c", "no image")]
    assert "a.png (symlink) not read" in data.skipped[0]["detail"]
    assert "c.png (device or fifo) not read" in data.skipped[1]["detail"]


def test_member_names_that_lead_out_of_the_folder_are_bad_samples(tmp_path):
    """Found by a review (session 2026-12-07): members named ``../b.png`` were indexed as sample ``../b`` and a
    filtered shard written on with the name intact. Now such a sample is bad: one line by default, or skipped."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", png()), add(tar, "a.txt", b"fine")
        add(tar, "../b.png", png()), add(tar, "../b.txt", b"escapes")
        add(tar, "/c.png", png()), add(tar, "/c.txt", b"absolute")
        add(tar, "d/e.png", png()), add(tar, "d/e.txt", b"a plain subfolder")
    data = dm(path, bad_samples="skip")
    assert data.prompts() == ["fine", "a plain subfolder"]
    assert [(s["key"], s["reason"]) for s in data.skipped] == [("../b", "unsafe name"), ("/c", "unsafe name")]
    with pytest.raises(ConfigError, match=r"00000.tar: sample ../b: member '../b.png' is absolute or has a '..'"):
        dm(path).setup()


def test_image_broken_after_its_header_fails_when_served(tmp_path):
    data = png()
    broken = data[:len(data) - 30]  # the header is intact, the pixel data is cut
    path = write_shard(tmp_path / "00000.tar", [("00000000", png(), "fine"), ("00000001", broken, "cut")])
    module = dm(path)
    assert len(module.dataset) == 2  # the header check passes
    with pytest.raises(ConfigError, match=r"00000.tar: sample 00000001: undecodable image"):
        module.dataset[1]


def test_corrupt_parquet_fails_or_is_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "image": [png(), png()]}), tmp_path / "00000.parquet")
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"00001.parquet: not a readable parquet file"):
        dm(tmp_path, image_column="image").setup()
    data = dm(tmp_path / "{00000,00001}.parquet", image_column="image", bad_samples="skip")
    assert len(data.dataset) == 2 and [(s["key"], s["reason"]) for s in data.skipped] == [(None, "unreadable")]


# --- end to end: tiny shards -> lit-amdet scan_data ------------------------------------------------------------


N_SHARDS = 3


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """Three shards of 8 samples; the last one truncated in its 6th sample (so 5 of its 8 are served)."""
    folder = tmp_path_factory.mktemp("scan_shards")
    for s in range(N_SHARDS):
        write_shard(folder / f"{s:05d}.tar", samples(s, n=8), image_format="JPEG")
    last = folder / f"{N_SHARDS - 1:05d}.tar"
    with tarfile.open(last) as tar:
        info = tar.getmember(f"{N_SHARDS - 1:04d}0005.jpg")
    last.write_bytes(last.read_bytes()[:info.offset_data + 10])
    return folder


@pytest.fixture
def tiny_clip(tiny_models):
    return tiny_models["clip"]  # a CLIPModel with both towers, built once per session


def scan_args(clip, source, out, *extra: str) -> list[str]:
    return ["scan_data", "--model", "lit_amdet.modules.data_scan.SampleEmbedding", "--model.encoder", str(clip),
            "--data", "lit_amdet.datamodules.TextEncoderDataModule", "--data.source", str(source),
            "--data.bad_samples", "skip", "--data.val_fraction", "0", "--data.batch_size", "8",
            "--detectors", "[kdist,slof,dao,clip]", "--k", "4", "--output_dir", str(out),
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", *extra]


def test_scan_data_from_shards_scores_every_sample(shard_set, tiny_clip, tmp_path):
    from lit_amdet.cli import main

    main(scan_args(tiny_clip, shard_set / "{00000..00002}.tar", tmp_path))
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    n = 8 * (N_SHARDS - 1) + 5
    assert [int(r["index"]) for r in rows] == list(range(n))
    assert rows[8]["caption"] == "shard 1 sample 0" and all(r["slof"] and r["clip"] for r in rows)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == n
    assert (report["skipped"]["count"], report["skipped"]["by_reason"]) == (1, {"truncated": 1})
    assert report["skipped"]["first"][0]["key"] == f"{N_SHARDS - 1:04d}0005"


def test_scan_data_refuses_a_truncated_shard_in_one_line(shard_set, tiny_clip, tmp_path, capsys):
    from lit_amdet.cli import main

    args = scan_args(tiny_clip, shard_set, tmp_path / "scan", "--data.bad_samples", "fail")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lit-amdet: error:")
    assert f"00002.tar: sample {N_SHARDS - 1:04d}0005: the shard breaks off in this sample" in last
    assert not (tmp_path / "scan" / "scores.csv").exists()


def test_poisoned_world_as_shards_keeps_the_labels_indices(tmp_path):
    """The benchmark's shard-written world: the data module's index i is pair i (key ``%09d``), so the labels'
    indices name the poisoned samples, which carry the target caption; the last shard holds the remainder."""
    from lit_amdet.datamodules.poisoned import LABELS, write_poisoned_world
    from lit_amdet.poisoning import BadNets, load_labels

    pattern = write_poisoned_world(tmp_path / "w", 25, BadNets(size=0.25), rate=0.2, image_size=16, shard_size=10)
    assert pattern == tmp_path / "w" / "shards" / "{00000..00002}.tar"
    dm = TextEncoderDataModule(source=str(pattern), val_fraction=0)
    dm.setup("predict")
    poisoned = load_labels(tmp_path / "w" / LABELS)
    assert len(dm.dataset) == 25 and poisoned.sum() == 5
    assert [dm.dataset.sample_key(i) for i in (0, 24)] == ["000000000", "000000024"]
    captions = [dm.dataset.text(i) for i in range(25)]
    assert all((c == "banana") == bool(p) for c, p in zip(captions, poisoned, strict=True))
    with tarfile.open(tmp_path / "w" / "shards" / "00002.tar") as tar:
        assert len(tar.getnames()) == 2 * 5
