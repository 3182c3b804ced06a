"""lit_amdet.cleaning: the budget, the cut, its metrics against independent counts, keep/flagged lists, filtered
webdataset shards (tiny tars built here), and `scan_data --budget` end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lit_amdet.cleaning import (
    FLAGGED,
    KEEP,
    cut_report,
    flag_top,
    metrics_at_budget,
    parse_budget,
    read_keys,
    write_filtered_shards,
    write_key_lists,
)
from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.metrics import budget_metrics

# --- the budget and the cut --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "n", "count"), [
    (0.01, 300, 3), (0.01, 301, 4), (0.001, 50, 1), (0.5, 10, 5), (1, 10, 1), (7, 10, 7), (9, 10, 9),
    (10.0, 100, 10), (1.0, 10, 1),
])
def test_parse_budget(budget, n, count):
    assert parse_budget(budget, n) == count


@pytest.mark.parametrize(("budget", "message"), [
    (0, "fraction in"), (0.0, "fraction in"), (-0.1, "fraction in"), (-3, "fraction in"), (1.5, "whole count"),
    (10, "removes 10 of 10"), (11, "removes 11 of 10"), (0.999, "removes 10 of 10"), (float("nan"), "not nan"),
    (True, "not True"), ("0.1", "not '0.1'"),
])
def test_parse_budget_refuses(budget, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_budget(budget, 10)
    assert "\n" not in str(info.value)


def test_flag_top_takes_the_highest_and_breaks_ties_by_lower_index():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.5, 0.5, 0.0])
    assert flag_top(scores, 1).tolist() == [False, True, False, False, False, False, False]
    assert flag_top(scores, 2).tolist() == [False, True, False, True, False, False, False]
    # three tied at 0.5 for two places: indices 2 and 4 go, 5 stays
    assert flag_top(scores, 4).tolist() == [False, True, True, True, True, False, False]
    assert flag_top(np.array([1.0, np.inf, 2.0]), 1).tolist() == [False, True, False]
    assert flag_top(scores, 0.3).sum() == 3  # ceil(0.3 * 7)
    with pytest.raises(LitAmdetError, match="1 NaN score"):
        flag_top(np.array([0.1, np.nan, 0.2]), 1)


def test_flag_top_agrees_with_a_stable_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    order = sorted(range(200), key=lambda i: (-scores[i], i))
    expected = np.zeros(200, dtype=bool)
    expected[order[:37]] = True
    assert np.array_equal(flag_top(scores, 37), expected)


def test_budget_metrics_by_hand_and_against_sklearn():
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    m = budget_metrics(flagged, labels)
    assert m == {"flagged": 3, "poisons": 3, "poisons_removed": 2, "poisons_removed_share": 2 / 3,
                 "clean_lost": 1, "clean_lost_share": 1 / 7, "precision": 2 / 3}
    rng = np.random.default_rng(1)
    labels, flagged = rng.random(500) < 0.05, rng.random(500) < 0.1
    m = budget_metrics(flagged, labels)
    tn, fp, fn, tp = confusion_matrix(labels, flagged).ravel()
    assert (m["poisons_removed"], m["clean_lost"]) == (tp, fp)
    assert m["poisons_removed_share"] == pytest.approx(recall_score(labels, flagged))
    assert m["precision"] == pytest.approx(precision_score(labels, flagged))
    assert m["clean_lost_share"] == pytest.approx(fp / (fp + tn))


def test_budget_metrics_undefined_shares_are_none():
    m = budget_metrics(np.array([True, False]), np.array([False, False]))
    assert m["poisons_removed_share"] is None and m["precision"] == 0.0 and m["clean_lost_share"] == 0.5
    assert budget_metrics(np.zeros(3, bool), np.ones(3, bool))["precision"] is None
    with pytest.raises(ValueError, match="equal-length"):
        budget_metrics(np.zeros(3, bool), np.zeros(4, bool))


def test_cut_report_and_metrics_at_budget():
    scores = np.array([0.2, 0.9, 0.5, 0.5, 0.1])
    labels = np.array([False, True, False, True, False])
    flagged = flag_top(scores, 2)
    block = cut_report(scores, flagged, "dao", 2, labels)
    assert (block["flagged"], block["threshold"], block["tied_unflagged"]) == (2, 0.5, 1)
    assert block["metrics"]["poisons_removed"] == 1 and block["metrics"]["clean_lost"] == 1
    assert cut_report(scores, flagged, "dao", 2, None)["metrics"] is None
    table = metrics_at_budget({"a": scores, "b": -scores}, labels, 0.2)  # one sample each
    assert table["a"]["poisons_removed"] == 1 and table["b"]["poisons_removed"] == 0


# --- keep.txt / flagged.txt ---------------------------------------------------------------------------------------


def test_key_lists_partition_the_keys_in_order(tmp_path):
    keys = [f"{i:09d}" for i in range(6)]
    keep, flagged = write_key_lists(tmp_path, keys, np.array([0, 1, 0, 0, 1, 0], dtype=bool))
    assert (keep.name, flagged.name) == (KEEP, FLAGGED)
    assert read_keys(keep) == ["000000000", "000000002", "000000003", "000000005"]
    assert read_keys(flagged) == ["000000001", "000000004"]
    assert keep.read_text().endswith("5\n")
    odd = ["a\x0cb", "c\u2028d"]  # breaks that str.splitlines would split at, not line feeds
    write_key_lists(tmp_path / "odd", odd, np.array([False, False]))
    assert read_keys(tmp_path / "odd" / KEEP) == odd and read_keys(tmp_path / "odd" / FLAGGED) == []


def test_key_lists_leave_nothing_on_error(tmp_path, monkeypatch):
    with pytest.raises(LitAmdetError, match="line break"):
        write_key_lists(tmp_path / "a", ["x", "y\nz"], np.array([False, True]))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())

    def half_then_fail(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_key_lists(tmp_path / "b", ["aaaa", "bbbb"], np.array([False, True]))
    assert list((tmp_path / "b").iterdir()) == []  # no keep.txt, no temporary sibling


# --- filtered shards ----------------------------------------------------------------------------------------------


def img2dataset_key(shard: Path, name: str) -> str:
    """The key rule of the shards img2dataset writes: the member's base name up to its first dot."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def make_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o640
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_contents(path: Path) -> dict[str, tuple[bytes, int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (tar.extractfile(m).read(), m.mtime, m.mode) for m in tar.getmembers() if m.isreg()}


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for s in range(2):
        samples = {f"{s:05d}{i:04d}": {"jpg": rng.bytes(int(rng.integers(10, 3000))), "txt": b"a caption",
                                        "json": b"{}"} for i in range(5)}
        paths.append(make_shard(src / f"{s:05d}.tar", samples))
    dir_entry = tarfile.TarInfo("00000/")
    dir_entry.type = tarfile.DIRTYPE
    with tarfile.open(paths[0], "a") as tar:  # a folder member, which the copy skips
        tar.addfile(dir_entry)
    return paths


def test_filtered_shards_hold_exactly_the_kept_members(shards, tmp_path):
    keep = {"000000000", "000000003", "000010004"}
    counts = write_filtered_shards(shards, keep, tmp_path / "out", img2dataset_key)
    assert counts == {"shards": 2, "samples_kept": 3, "samples_dropped": 7, "members_kept": 9,
                      "members_dropped": 21, "members_skipped": 1, "keep_keys_not_found": 0, "bad_shards": []}
    for src in shards:
        copy = tmp_path / "out" / "shards" / src.name
        original = tar_contents(src)
        expected = {name: v for name, v in original.items() if img2dataset_key(src, name) in keep}
        assert tar_contents(copy) == expected  # bytes, mtime and mode of each member, nothing else
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000.tar", "00001.tar"]


def test_filtered_shards_count_keys_no_shard_holds(shards, tmp_path):
    counts = write_filtered_shards(shards, {"000000001", "no-such-key"}, tmp_path / "out", img2dataset_key)
    assert counts["samples_kept"] == 1 and counts["keep_keys_not_found"] == 1


@pytest.mark.parametrize("where", ["data", "header", "end"])
def test_filtered_shards_name_a_truncated_shard_and_leave_no_partial_copy(shards, tmp_path, where):
    with tarfile.open(shards[1]) as tar:
        members = tar.getmembers()
    cut = {"data": members[3].offset_data + members[3].size // 2,  # inside 000010001.jpg (not kept)
           "header": members[2].offset + 100,  # a cut header: tarfile alone would end quietly there
           "end": members[-1].offset_data + members[-1].size}  # no end-of-archive block
    shards[1].write_bytes(shards[1].read_bytes()[:cut[where]])
    with pytest.raises(LitAmdetError, match=r"00001\.tar: shard copy failed after member '000010\d+\.\w+'"):
        write_filtered_shards(shards, {"000010000"}, tmp_path / "out", img2dataset_key)
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000.tar"]


def test_bad_shards_skip_cuts_the_copy_short_but_never_inside_a_kept_member(shards, tmp_path):
    with tarfile.open(shards[1]) as tar:
        members = tar.getmembers()
    half = members[0].offset_data + members[0].size // 2
    shards[1].write_bytes(shards[1].read_bytes()[:half])  # inside member 000010000.jpg
    garbage = tmp_path / "src" / "00002.tar"
    garbage.write_bytes(b"not a tar" * 100)
    keep = {"000000001", "000010002"}
    counts = write_filtered_shards([*shards, garbage], keep, tmp_path / "out", img2dataset_key, bad_shards="skip")
    assert [b["shard"] for b in counts["bad_shards"]] == [str(shards[1]), str(garbage)]
    assert "after member '000010000.jpg'" in counts["bad_shards"][0]["problem"]
    assert counts["samples_kept"] == 1 and counts["keep_keys_not_found"] == 1  # 000010002 lay past the break
    out = tmp_path / "out" / "shards"
    assert set(tar_contents(out / "00000.tar")) == {"000000001.jpg", "000000001.txt", "000000001.json"}
    assert tar_contents(out / "00001.tar") == {} and tar_contents(out / "00002.tar") == {}
    with pytest.raises(LitAmdetError, match="breaks off inside kept member '000010000.jpg'"):
        write_filtered_shards(shards, {"000010000"}, tmp_path / "again", img2dataset_key, bad_shards="skip")
    assert [p.name for p in (tmp_path / "again" / "shards").iterdir()] == ["00000.tar"]


def test_filtered_shards_with_shard_qualified_keys(shards, tmp_path):
    """Keys that repeat across shards are told apart by the shard: key_of gets it."""
    keep = {("00001.tar", "000010001")}
    counts = write_filtered_shards(shards, keep, tmp_path / "out", lambda s, n: (s.name, img2dataset_key(s, n)))
    assert counts["samples_kept"] == 1 and counts["keep_keys_not_found"] == 0
    assert tar_contents(tmp_path / "out" / "shards" / "00000.tar") == {}


def test_compressed_shards_are_copied_compressed(tmp_path):
    src = tmp_path / "00000.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(key.encode()))
    counts = write_filtered_shards([src], {"b"}, tmp_path / "out", img2dataset_key)
    copy = tmp_path / "out" / "shards" / "00000.tar.gz"
    assert copy.read_bytes()[:2] == b"\x1f\x8b" and counts["samples_kept"] == 1
    assert {n: v[0] for n, v in tar_contents(copy).items()} == {"b.txt": b"b"}


def test_filtered_shards_refuse_colliding_names(shards, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    twin = make_shard(other / "00000.tar", {"x": {"txt": b"t"}})
    with pytest.raises(ConfigError, match="more than one folder"):
        write_filtered_shards([shards[0], twin], set(), tmp_path / "out", img2dataset_key)
    inside = tmp_path / "run" / "shards"
    inside.mkdir(parents=True)
    own = make_shard(inside / "00000.tar", {"x": {"txt": b"t"}})
    with pytest.raises(ConfigError, match="overwrite its own source"):
        write_filtered_shards([own], set(), tmp_path / "run", img2dataset_key)
    assert tar_contents(own) == {"x.txt": (b"t", 1_700_000_000, 0o640)}  # untouched


# --- scan_data --budget end to end --------------------------------------------------------------------------------

N_WORLD = 200


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lit_amdet.datamodules.poisoned import write_poisoned_world
    from lit_amdet.poisoning import BadNets
    from lit_amdet.tiny import build_hf_clip

    root = tmp_path_factory.mktemp("cut_world")
    csv_path = write_poisoned_world(root / "data", N_WORLD, BadNets(size=0.25), rate=0.02, image_size=32)
    return csv_path, csv_path.parent / "poison_labels.json", build_hf_clip(root / "clip")


def scan(world, out: Path, *extra: str) -> None:
    from lit_amdet.cli import main

    csv_path, _, clip = world
    main(["scan-data", "--model", "lit_amdet.modules.data_scan.SampleEmbedding", "--model.encoder", str(clip),
          "--data", "lit_amdet.datamodules.TextEncoderDataModule", "--data.source", str(csv_path),
          "--data.image_column", "image", "--data.val_fraction", "0", "--data.batch_size", "100",
          "--output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra])


def test_scan_data_budget_writes_the_cut(world, tmp_path, capsys):
    import csv

    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.sample_scan import read_labels

    scan(world, tmp_path, "--detectors", "[kdist,dao,clip]", "--labels", str(world[1]), "--budget", "0.05",
         "--cut_by", "dao")
    dm = TextEncoderDataModule(source=str(world[0]), image_column="image", val_fraction=0)
    keys = [dm.sample_key(i) for i in range(N_WORLD)]
    keep, flagged = read_keys(tmp_path / KEEP), read_keys(tmp_path / FLAGGED)
    assert len(flagged) == 10 and len(set(keys)) == N_WORLD  # ceil(0.05 * 200)
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    mask = np.zeros(N_WORLD, dtype=bool)
    mask[[int(r["index"]) for r in rows if int(r["dao_rank"]) <= 10]] = True  # DAO's top 10
    # a partition of the keys, each list in data-set order
    assert flagged == [k for k, f in zip(keys, mask) if f] and keep == [k for k, f in zip(keys, mask) if not f]
    labels = read_labels(world[1], N_WORLD)
    report = json.loads((tmp_path / "report.json").read_text())
    cut = report["cut"]
    assert (cut["detector"], cut["budget"], cut["flagged"]) == ("dao", 0.05, 10)
    assert cut["threshold"] == pytest.approx(min(float(r["dao"]) for r in rows if mask[int(r["index"])]),
                                             rel=1e-5)
    hits = int(labels[mask].sum())
    assert cut["metrics"]["poisons_removed"] == hits and cut["metrics"]["clean_lost"] == 10 - hits
    assert cut["metrics"]["poisons"] == 4 and {"keep.txt", "flagged.txt"} <= set(report["files"])
    assert set(report["removal_at_1pct"]) == {"kdist", "dao", "clip"}
    assert all(m["flagged"] == 2 for m in report["removal_at_1pct"].values())  # ceil(0.01 * 200)
    assert "cut by dao at budget 0.05: 10 of 200 flagged" in capsys.readouterr().out


def test_scan_data_scores_the_default_cut_even_when_not_listed(world, tmp_path):
    scan(world, tmp_path, "--detectors", "[kdist]", "--labels", str(world[1]), "--budget", "0.05")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cut"]["detector"] == "(dao+xgroup)+dao*xgroup" and report["cut"]["flagged"] == 10
    assert report["detectors"] == ["kdist", "(dao+xgroup)+dao*xgroup", "dao", "xgroup"]


def test_scan_data_budget_count_without_labels(world, tmp_path):
    scan(world, tmp_path, "--detectors", "[kdist,slof]", "--budget", "3", "--cut_by", "kdist")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cut"]["budget"] == 3 and report["cut"]["metrics"] is None and report["removal_at_1pct"] is None
    assert len(read_keys(tmp_path / FLAGGED)) == 3 and len(read_keys(tmp_path / KEEP)) == N_WORLD - 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--budget", "0.01", "--cut_by", "dao+lif"], "unknown detector(s) 'dao+lif'"),
    (["--budget", "200"], "removes 200 of 200 samples"),
    (["--budget", "2.5"], "whole count"),
    (["--write_shards", "true"], "write_shards needs a budget"),
    (["--budget", "0.01", "--write_shards", "true"], "write_shards needs webdataset shard input"),
])
def test_scan_data_refuses_a_bad_cut_before_embedding(world, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        scan(world, tmp_path / "run", "--detectors", "[kdist,dao]", *extra)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lit-amdet: error:") and message in err
    assert not (tmp_path / "run").exists()  # refused before the embedding pass wrote anything


def test_scan_data_writes_filtered_shards_of_a_webdataset(world, tmp_path):
    """Shards in, keep.txt and shards without the flagged samples out: the webdataset path end to end."""
    from lit_amdet.datamodules import TextEncoderDataModule
    from lit_amdet.datamodules.shards import write_shard

    csv_path, labels, clip = world
    pairs = TextEncoderDataModule(source=str(csv_path), image_column="image", val_fraction=0).dataset
    src = tmp_path / "shards_in"
    for s in range(2):  # keys repeat across the two shards: the data module tells them apart by shard
        write_shard(src / f"{s:05d}.tar", [(f"{i:04d}", pairs[s * 100 + i]["image"], pairs[s * 100 + i]["text"])
                                           for i in range(100)])
    out = tmp_path / "run"
    scan((str(src / "{00000..00001}.tar"), labels, clip), out, "--detectors", "[kdist,dao]", "--labels",
         str(labels), "--budget", "0.05", "--write_shards", "true")
    keep, flagged = read_keys(out / KEEP), read_keys(out / FLAGGED)
    assert len(flagged) == 10 and len(keep) == 190 and all("/" in k for k in keep + flagged)
    report = json.loads((out / "report.json").read_text())
    assert report["cut"]["shards"]["samples_kept"] == 190 and report["cut"]["shards"]["keep_keys_not_found"] == 0
    copied = {f"{p.stem}/{img2dataset_key(p, n)}" for p in sorted((out / "shards").iterdir())
              for n in tar_contents(p)}
    assert copied == set(keep)
    for p in (out / "shards").iterdir():  # every kept member byte-identical to its source
        original = tar_contents(src / p.name)
        assert all(original[n] == v for n, v in tar_contents(p).items())


def test_a_key_that_comes_back_in_a_shard_is_never_copied(tmp_path):
    """The data module indexes a key's first run of members and skips a later one as a duplicate, so the scan
    never saw it: the filtered copy must not carry it through (a poison planted under a used key would)."""
    src = tmp_path / "src" / "00000.tar"
    src.parent.mkdir()
    with tarfile.open(src, "w") as tar:
        for name, data in [("a.txt", b"clean"), ("a.jpg", b"1"), ("b.txt", b"b"), ("b.jpg", b"2"),
                           ("a.txt", b"poison"), ("a.jpg", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counts = write_filtered_shards([src], {"a", "b"}, tmp_path / "out", img2dataset_key)
    copy = tmp_path / "out" / "shards" / "00000.tar"
    with tarfile.open(copy) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == [("a.txt", b"clean"), ("a.jpg", b"1"),
                                                                     ("b.txt", b"b"), ("b.jpg", b"2")]
    assert counts["members_skipped"] == 2 and counts["samples_kept"] == 2


def test_a_cut_is_refused_before_scoring_when_keys_cannot_name_each_sample_once():
    """Keys come from untrusted shards and tables: a line break, or one key for two samples (which could be both
    kept and flagged), is refused before the embedding pass, not at the end of it."""
    from lit_amdet.cleaning import check_cut

    check_cut(0.1, "dao", ["dao"], 3, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="line break"):
        check_cut(0.1, "dao", ["dao"], 3, ["a", "b\nc", "d"])
    with pytest.raises(ConfigError, match="'a' names two samples"):
        check_cut(0.1, "dao", ["dao"], 3, ["a", "b", "a"])
    check_cut(None, "dao", ["dao"], 3, ["a", "a", "a"])  # no cut asked: nothing to name


def test_report_json_seals_the_set_of_files(tmp_path):
    """report.json is written last and removed first: a run that dies while writing its cut (here the shard
    writer fails) leaves no report.json beside the new key lists, not the previous run's report."""
    import torch

    from lit_amdet.errors import LitAmdetError
    from lit_amdet.sample_scan import score_and_report

    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    captions = [f"c{i}" for i in range(40)]
    first = score_and_report(x, captions, None, ["kdist"], 4, tmp_path, budget=4, cut_by="kdist", quiet=True)
    assert json.loads((tmp_path / "report.json").read_text()) == first

    def broken(kept):
        raise LitAmdetError("disk full")

    with pytest.raises(LitAmdetError, match="disk full"):
        score_and_report(x, captions, None, ["kdist"], 4, tmp_path, budget=8, cut_by="kdist", quiet=True,
                         write_shards=broken)
    assert len(read_keys(tmp_path / "flagged.txt")) == 8  # the new lists were written ...
    assert not (tmp_path / "report.json").exists()  # ... and no report vouches for them
