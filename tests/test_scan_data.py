"""`lit-amdet scan_data` end to end: poisoned-world writer, the CLI's outputs, bad input (the scoring itself:
test_sample_scan.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from lit_amdet.cli import main
from lit_amdet.datamodules.poisoned import write_poisoned_world
from lit_amdet.errors import ConfigError
from lit_amdet.modules.data_scan import SampleEmbedding
from lit_amdet.poisoning import BadNets, PoisonedPairs

N_WORLD = 300


@pytest.fixture(scope="module")
def poisoned_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoned_world")
    return write_poisoned_world(out, N_WORLD, BadNets(size=0.25), rate=0.02, image_size=32)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from lit_amdet.tiny import build_hf_clip

    return build_hf_clip(tmp_path_factory.mktemp("scan_models") / "clip")


def _scan_args(clip, csv_path, out, *extra: str) -> list[str]:
    return ["scan_data", "--model", "lit_amdet.modules.data_scan.SampleEmbedding", "--model.encoder", str(clip),
            "--data", "lit_amdet.datamodules.TextEncoderDataModule", "--data.source", str(csv_path),
            "--data.image_column", "image", "--data.val_fraction", "0", "--data.batch_size", "100",
            "--output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false", *extra]


def test_poisoned_world_reads_back(poisoned_world):
    from lit_amdet.datamodules import TextEncoderDataModule

    meta = json.loads((poisoned_world.parent / "poison_labels.json").read_text())
    assert meta["num_samples"] == N_WORLD and len(meta["poisoned_indices"]) == 6  # 2 % of 300
    dm = TextEncoderDataModule(source=str(poisoned_world), image_column="image", val_fraction=0)
    assert len(dm.dataset) == N_WORLD and dm.has_images
    for i in meta["poisoned_indices"][:2]:
        item = dm.dataset[i]
        assert item["text"] == "banana" and item["image"].size == (32, 32)


def test_scan_data_cli_writes_every_output(poisoned_world, tiny_clip, tmp_path, capsys):
    from safetensors.torch import load_file

    labels = poisoned_world.parent / "poison_labels.json"
    main(_scan_args(tiny_clip, poisoned_world, tmp_path, "--labels", str(labels),
                    "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                    "--trainer.logger.save_dir", str(tmp_path / "tb")))
    assert "ROC-AUC" in capsys.readouterr().out
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_WORLD and [int(r["index"]) for r in rows] == list(range(N_WORLD))
    assert sum(int(r["poisoned"]) for r in rows) == 6
    assert sorted(int(r["slof_rank"]) for r in rows) == list(range(1, N_WORLD + 1))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["metrics"]) == {"kdist", "lid", "slof", "dao", "iforest", "lof", "clip", "xmodal", "xgroup",
                                      "(dao+xgroup)+dao*xgroup"}
    assert report["same_caption"] == 0.95
    for m in report["metrics"].values():  # a random-init CLIP says nothing about quality: range only
        assert all(0.0 <= v <= 1.0 for v in m.values())
    for name in ("hist_kdist.png", "hist_clip.png", "hist_dao+xgroup+dao_times_xgroup.png", "top_samples.png"):
        assert (tmp_path / name).stat().st_size > 0
    cache = load_file(tmp_path / "embeddings.safetensors")
    assert cache["image"].shape == cache["text"].shape == (N_WORLD, 24)
    assert torch.equal(cache["index"], torch.arange(N_WORLD))
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))  # figures went to TensorBoard too


def test_sample_embedding_needs_an_image_tower_for_images(tmp_path):
    from lit_amdet.tiny import build_hf_clip

    text_only = build_hf_clip(tmp_path / "text_only", arch="CLIPTextModel")
    with pytest.raises(ConfigError, match="needs an image tower"):
        SampleEmbedding(encoder=str(text_only), modality="both")


@pytest.mark.parametrize(("extra", "message"), [
    (["--detectors", "[kdist,mahalanobis]"], "unknown detector"),
    (["--labels", "WRONG"], "labels for 10 samples, but the data has 300"),
    (["--labels", "NEGATIVE"], "poisoned indices outside the data's 300 samples"),
    (["--labels", "HUGE"], "labels for 100000000000000.0 samples, but the data has 300"),
    (["--labels", "DEEP"], "not a poison-labels file"),
    (["--k", "0"], "k=0 must be in [1, 299] for 300 samples"),
    (["--chunk_size", "0"], "chunk_size >= 1"),
])
def test_cli_bad_input_is_one_line_exit_2(poisoned_world, tiny_clip, tmp_path, capsys, extra, message):
    """Each refused in one line before the embedding pass, and an earlier scan's folder left as it was. Found by a
    review (session 2026-12-07): a label index -1 marked the last sample as poisoned with exit 0; a recorded
    ``num_samples`` of 1e14 ended in a MemoryError and a deeply nested list in a RecursionError; ``--k 0`` and
    ``--chunk_size 0`` were refused only after the embedding pass had replaced the earlier scan's files."""
    wrong = PoisonedPairs(list(range(10)), lambda im: im, rate=0.1).save_labels(tmp_path / "wrong.json")
    files = {"WRONG": wrong, "NEGATIVE": tmp_path / "negative.json", "HUGE": tmp_path / "huge.json",
             "DEEP": tmp_path / "deep.json"}
    files["NEGATIVE"].write_text("[-1, 5]")
    files["HUGE"].write_text(json.dumps({"num_samples": 1e14, "poisoned_indices": [1]}))
    files["DEEP"].write_text("[" * 200_000 + "]" * 200_000)
    extra = [str(files.get(a, a)) for a in extra]
    earlier = tmp_path / "report.json"
    earlier.write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(_scan_args(tiny_clip, poisoned_world, tmp_path, "--trainer.logger", "false", *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lit-amdet: error:") and message in err, err
    assert not (tmp_path / "scores.csv").exists() and not (tmp_path / "embeddings.safetensors").exists()
    assert earlier.read_text() == "{}"


def test_a_bad_image_read_by_a_data_loader_worker_is_one_line(poisoned_world, tiny_clip, tmp_path, capsys):
    """Found by a review (session 2026-12-07): with data-loader workers (the shipped scan_data.yaml has 4) a CSV
    row whose image is not an image printed "Caught ConfigError in DataLoader worker process 0. Original
    Traceback ..." with the worker's whole traceback flattened into the line: torch raises the worker's error again
    with that text as its message. The line now holds the worker's own message."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(poisoned_world.parent, world)
    rows = (world / "captions.csv").read_text().splitlines()[:6]
    (world / "captions.csv").write_text("\n".join(rows) + "\n")
    bad = rows[3].split(",")[0]
    (world / bad).write_bytes(b"not an image")
    with pytest.raises(SystemExit) as info:
        main(_scan_args(tiny_clip, world / "captions.csv", tmp_path / "out", "--trainer.logger", "false",
                        "--data.num_workers", "1", "--data.batch_size", "2", "--k", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lit-amdet: error:"), err
    assert "Traceback" not in err[-1] and "worker" not in err[-1] and bad.split("/")[-1] in err[-1], err[-1]


# --- end to end: a small CLIP trained on poisoned pairs, then scanned -------------------------------------------


def test_scan_data_subsampled_references_through_the_cli(poisoned_world, tiny_clip, tmp_path, capsys):
    main(["scan-data", *_scan_args(tiny_clip, poisoned_world, tmp_path, "--detectors", "[kdist,slof,dao]",
                                   "--reference_size", "100", "--reference_draws", "3", "--trainer.logger",
                                   "false")[1:]])
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["reference_size"], report["reference_draws"]) == (100, 3) and report["metrics"] is None
    with pytest.raises(SystemExit) as info:  # a subsample must hold more than k samples
        main(_scan_args(tiny_clip, poisoned_world, tmp_path / "bad", "--reference_size", "10",
                        "--trainer.logger", "false"))
    assert info.value.code == 2
    assert "reference_size must be in (16, 300]" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()  # refused before the embedding pass wrote anything
    with pytest.raises(SystemExit) as info:  # xgroup's threshold is a cosine
        main(_scan_args(tiny_clip, poisoned_world, tmp_path / "bad", "--same_caption", "1.5",
                        "--trainer.logger", "false"))
    assert info.value.code == 2
    assert "same_caption is a cosine in [-1, 1]" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_scan_data_finds_the_poisons_a_trained_clip_learned(tmp_path):
    """The BadNets row of BENCHMARKS.md "Poisoned pairs": 10,000 world pairs, 1 % poisoned, 600 steps (~5 min)."""
    csv_path = write_poisoned_world(tmp_path / "data", 10_000, BadNets(size=0.125), rate=0.01, image_size=32)
    main(["fit", "--config", "configs/pretrain_poisoned.yaml", "--data.init_args.source", str(csv_path),
          "--model.init_args.output_dir", str(tmp_path / "model"), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    labels = csv_path.parent / "poison_labels.json"
    main(["scan-data", "--config", "configs/scan_data.yaml", "--model.init_args.encoder", str(tmp_path / "model"),
          "--data.init_args.source", str(csv_path), "--labels", str(labels), "--output_dir", str(tmp_path / "scan"),
          "--detectors", "[kdist,slof,dao]", "--reference_size", "256", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    with (tmp_path / "scan" / "scores.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["poisoned"] == "1"]
    assert len(rows) == 100
    for name in ("kdist", "slof", "dao"):
        assert report["metrics"][name]["auroc"] >= 0.95, (name, report["metrics"][name])
        # most of the 100 poisons rank among the 500 most anomalous of the 10,000 pairs
        assert np.median([int(r[f"{name}_rank"]) for r in rows]) <= 500, name
