"""The neighbour search spread over processes (`ShardedSearch`) gives the one-process lists and scores bit for bit:
2 CPU processes (gloo) on data with ties and duplicates, and ``lit-amdet scan_data`` under DDP end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lit_amdet.neighbours import ShardedSearch, knn, merge_neighbours
from lit_amdet.outliers import score_samples, xmodal_score

NAMES = ("kdist", "lid", "slof", "dao")
#: the cases xmodal and xgroup are also spread over processes in (their captions: `_captions`)
XMODAL_CASES = ("ints_k16", "floats", "ints_subsampled")


def _data() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 3, size=(71, 3))  # exact distances: ties everywhere, plus 20 identical points
    floats = rng.normal(size=(301, 16))
    floats[100:110] = floats[5]  # 11 copies of one point
    floats[200] = floats[7]
    return {"ints": torch.from_numpy(np.concatenate([ints, np.full((20, 3), 7)])).float(),
            "floats": torch.from_numpy(floats).float(), "tiny": torch.from_numpy(floats[:30]).float()}


#: name -> (data, k, score_samples options); "tiny": shares of 15 rows cannot hold k = 16, process 0 searches alone
CASES: dict[str, tuple[str, int, dict]] = {
    "ints_k16": ("ints", 16, {}),
    "ints_k3": ("ints", 3, {}),
    "floats": ("floats", 16, {}),
    "floats_cosine": ("floats", 8, {"metric": "cosine"}),
    "floats_reference_power": ("floats", 16, {"variant": "reference", "dao_form": "power"}),
    "ints_subsampled": ("ints", 4, {"reference_size": 30, "reference_draws": 3, "seed": 2}),
    "floats_subsampled_reference": ("floats", 16, {"reference_size": 64, "reference_draws": 2,
                                                   "variant": "reference"}),
    "tiny": ("tiny", 16, {}),
}


def _captions(x: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.random.default_rng(len(x)).normal(size=(len(x), 4))).float()
    t[5:12] = t[3]  # one caption eight times: xgroup pools them
    return t


def _xmodal(x: torch.Tensor, k: int, opts: dict, search=None, chunk_size: int = 1024):
    """xmodal and xgroup (a 4-d caption: many within cosine 0.95 of each other)."""
    subsample = {key: opts[key] for key in ("reference_size", "reference_draws", "seed") if key in opts}
    xm = xmodal_score(x, _captions(x), k, chunk_size=chunk_size, search=search, **subsample)
    xg = score_samples(x, ("xgroup",), k, chunk_size=chunk_size, search=search, text_embeddings=_captions(x),
                       **subsample)
    return xm, xg.get("xgroup")  # {} on a helper process


def _pair_scores(x: torch.Tensor, k: int, opts: dict, search=None) -> dict:
    """Every detector through `score_samples`, as scan-data calls it: the kNN ones on image and caption side by
    side, xmodal and xgroup on the image alone."""
    both = torch.cat([x, _captions(x)], 1)
    return score_samples(both, [*NAMES, "xmodal", "xgroup"], k, chunk_size=29, search=search,
                         text_embeddings=_captions(x), image_embeddings=x, **opts)


def _lists(search, x: torch.Tensor, k: int, metric: str = "euclidean"):
    """The whole set against itself, and the set against every third row of it (the query-share mode)."""
    sub = torch.arange(0, len(x), 3 if len(x) >= 3 * (k + 2) else 1)
    own = torch.full((len(x),), -1)
    own[sub] = torch.arange(len(sub))
    return search(x, k=k, metric=metric, chunk_size=17), search(x, x[sub], k=k, metric=metric, self_index=own)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        search = ShardedSearch(rank, world, rows_per_exchange=37)  # several exchanges per search
        data, results = _data(), {}
        for name, (which, k, opts) in CASES.items():
            metric = opts.get("metric", "euclidean")
            results[name] = (_lists(search, data[which], k, metric),
                             score_samples(data[which], NAMES, k, chunk_size=29, search=search, **opts))
            if name in XMODAL_CASES:
                results[name + "_xmodal"] = _xmodal(data[which], k, opts, search, chunk_size=29)
                results[name + "_pair"] = _pair_scores(data[which], k, opts, search)
        try:  # a bad argument fails on every process before any exchange: none waits for the others
            search(data["ints"], k=len(data["ints"]))
        except ValueError:
            results["bad_k_refused"] = True
        if rank == 0:
            torch.save(results, out)
        else:
            assert all(r[1] == {} and r[0] == (None, None) for n, r in results.items() if n in CASES)
            assert all(results[n + "_xmodal"] == (None, None) for n in XMODAL_CASES)
            assert all(results[n + "_pair"] == {} for n in XMODAL_CASES)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert results.pop("bad_k_refused") is True
    data = _data()
    for name, (which, k, opts) in CASES.items():
        (whole, against_sub), scores = results[name]
        want_whole, want_sub = _lists(knn, data[which], k, opts.get("metric", "euclidean"))
        for got, want in ((whole, want_whole), (against_sub, want_sub)):
            assert torch.equal(got[1], want[1]), name  # neighbour indices
            assert torch.equal(got[0], want[0]), name  # distances, bitwise
        want = score_samples(data[which], NAMES, k, chunk_size=1024, **opts)
        for det in NAMES:
            assert torch.equal(scores[det], want[det]), (name, det)
        if name in XMODAL_CASES:
            for got, want in zip(results[name + "_xmodal"], _xmodal(data[which], k, opts)):
                assert torch.equal(got, want), name
            assert not torch.equal(*results[name + "_xmodal"]), name  # the groups pooled something
            one = _pair_scores(data[which], k, opts)
            assert all(torch.equal(results[name + "_pair"][d], one[d]) for d in one), name
            pair = zip(("xmodal", "xgroup"), _xmodal(data[which], k, opts))  # the kNN ones ran on image + caption
            assert all(torch.equal(one[d], want) for d, want in pair), name
    assert (results["ints_k16"][0][0][0][-20:] == 0).all()  # the duplicate group really is tied at 0


def test_lists_do_not_depend_on_blocking_or_threads():
    """What the spread search rests on: a list is a function of the data, not of how the work is cut."""
    x = _data()["floats"]
    base = knn(x, k=16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for chunk, ref_chunk in [(1, 5), (7, 16), (300, 301), (64, None)]:
            d, i = knn(x, k=16, chunk_size=chunk, ref_chunk_size=ref_chunk)
            assert torch.equal(i, base[1]) and torch.equal(d, base[0]), (chunk, ref_chunk)
    finally:
        torch.set_num_threads(threads)


def test_merge_keeps_the_k_best_by_distance_then_index():
    d = torch.tensor([[0.5, 1.0, 2.0, 0.5, 1.0, 3.0]])
    i = torch.tensor([[4, 1, 0, 2, 7, 9]])
    md, mi = merge_neighbours(d, i, 4)
    assert mi.tolist() == [[2, 4, 1, 7]] and md.tolist() == [[0.5, 0.5, 1.0, 1.0]]


def test_sharded_search_checks_its_rank():
    with pytest.raises(ValueError, match="rank"):
        ShardedSearch(2, 2)


# --- lit-amdet scan_data under DDP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_and_model(tmp_path_factory):
    from lit_amdet.datamodules.poisoned import write_poisoned_world
    from lit_amdet.poisoning import BadNets
    from lit_amdet.tiny import build_hf_clip

    root = tmp_path_factory.mktemp("ddp_scan")
    return (write_poisoned_world(root / "world", 300, BadNets(size=0.25), rate=0.02, image_size=32),
            build_hf_clip(root / "clip"))


def _rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_scan_data_on_two_processes_writes_the_one_process_scores(world_and_model, tmp_path):
    """2 CPU processes: both embed a half and search a share of the neighbours, process 0 writes the report; its
    scores.csv is the one a single process writes from the same embeddings (the cached embeddings.safetensors:
    a batch's composition may change an embedding's last bits, the search must not change anything)."""
    from safetensors.torch import load_file

    from lit_amdet import sample_scan

    world, clip = world_and_model
    out = tmp_path / "ddp"
    args = ["--model", "lit_amdet.modules.data_scan.SampleEmbedding", "--model.encoder", str(clip),
            "--data", "lit_amdet.datamodules.TextEncoderDataModule", "--data.source", str(world),
            "--data.image_column", "image", "--data.val_fraction", "0", "--data.batch_size", "64",
            "--detectors", "[kdist,lid,slof,dao,xmodal,xgroup]", "--k", "8", "--chunk_size", "50",
            "--output_dir", str(out),
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "lit_amdet", "scan_data", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr  # gloo's threads outliving the interpreter once aborted rank 1
    cache = load_file(out / "embeddings.safetensors")
    features = sample_scan.sample_features(cache["image"], cache["text"], "both")
    captions = [r["caption"] for r in _rows(out / "scores.csv")]
    sample_scan.score_and_report(features, captions, None, [*NAMES, "xmodal", "xgroup"], 8, tmp_path / "one",
                                 chunk_size=50, quiet=True, image_text=(cache["image"], cache["text"]))
    got, want = _rows(out / "scores.csv"), _rows(tmp_path / "one" / "scores.csv")
    assert len(got) == 300 and got == want


def test_a_failure_on_process_0_ends_every_process_with_one_line_each(world_and_model, tmp_path):
    """Process 0 fails alone between collectives (its embeddings file cannot be written: a folder holds the
    name), while process 1 waits in the neighbour search: the run ends at once with exit 2, process 0's own
    error, and one line from process 1 that says another process failed, not gloo's socket message."""
    world, clip = world_and_model
    out = tmp_path / "out"
    (out / "embeddings.safetensors").mkdir(parents=True)
    args = ["--model", "lit_amdet.modules.data_scan.SampleEmbedding", "--model.encoder", str(clip),
            "--data", "lit_amdet.datamodules.TextEncoderDataModule", "--data.source", str(world),
            "--data.image_column", "image", "--data.val_fraction", "0", "--data.batch_size", "64",
            "--detectors", "[kdist,dao]", "--k", "8", "--output_dir", str(out),
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "lit_amdet", "scan_data", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lit-amdet:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 2 and "embeddings.safetensors" in errors[0], errors
    assert errors[1] == ("lit-amdet: process 1: stopped: another process of the run failed (its own error, if it "
                         "printed one, is in this output)")
    assert "closed by peer" not in done.stderr and "Traceback" not in done.stderr
    assert not (out / "report.json").exists()
