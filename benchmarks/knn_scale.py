"""Scale of the exact global kNN detectors (k-distance, LID, SLOF, DAO): seconds and peak memory.

    python benchmarks/knn_scale.py [--sizes 20000 100000] [--large 1000000] [--shard 20000] [--dim 512] [--k 16]
                                   [--subsampled 1000000] [--device cpu] [--out benchmarks/results/knn_scale.json]
    python benchmarks/knn_scale.py --processes 2 --sizes 20000 100000 [--subsampled 1000000] --append

Data: unit vectors drawn around 1,000 random centres on the sphere (CLIP
embeddings are clustered), float32. For each of ``--sizes`` the whole
`score_samples` pipeline runs end to end. For ``--large`` (1,000,000 by
default) the full N x N search would take hours on a 2-core CPU, so the
benchmark times the real thing on a shard: the first ``--shard`` query rows
searched against all N references (`knn(..., self_index=...)`, exactly what a
process scoring that share of the set does), and then the detector stage
(k-distance, LID, SLOF, DAO from the [N, k] lists) on full-size lists. Query
blocks are independent, so the full search takes N / shard times the shard's
seconds; the end-to-end sizes check that this linear extrapolation holds.
``--subsampled`` sizes are scored end to end against random subsamples
(`score_samples(..., reference_size=256, reference_draws=8)`), the setting
that unmasks clumped poisons (BENCHMARKS.md, "Poisoned pairs").
Peak memory is the process's maximum resident set size.

``--pair`` (with ``--processes``) also times the two pair detectors scan-data cuts by
(``xmodal`` and ``xgroup``, what the default cut adds to DAO) on a
second N x dim matrix for the captions, after the kNN detectors, as scan-data
runs them: the row gets ``pair_seconds`` beside the kNN detectors' ``seconds``
(``--only_pair``: the pair detectors alone, ``seconds`` left empty).

``--processes P`` times the search spread over P CPU processes instead
(`lit_amdet.neighbours.ShardedSearch` over a gloo group, one thread each, as
``lit-amdet scan_data --trainer.strategy ddp --trainer.devices P`` runs it):
`score_samples` end to end at each of ``--sizes`` (whole set: each process
holds a share of the references) and ``--subsampled`` (each a share of the
queries); ``--processes 1`` is the same code in one process, the baseline.
Peak memory is then the largest of the processes'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from lit_amdet.neighbours import ShardedSearch
from lit_amdet.outliers import dao_score, kdist_score, knn, lid_score, score_samples, slof_score

DETECTORS = ("kdist", "lid", "slof", "dao")


def embeddings(n: int, dim: int, seed: int = 0, centres: int = 1000, spread: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g), dim=1)
    x = torch.empty(n, dim)
    for s in range(0, n, 100_000):  # in blocks: no [n, dim] temporaries beyond the result
        e = min(s + 100_000, n)
        pick = torch.randint(centres, (e - s,), generator=g)
        x[s:e] = torch.nn.functional.normalize(c[pick] + spread * torch.randn(e - s, dim, generator=g) / dim**0.5,
                                               dim=1)
    return x


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def end_to_end(n: int, args: argparse.Namespace) -> dict:
    x = embeddings(n, args.dim).to(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    score_samples(x, DETECTORS, args.k, chunk_size=args.chunk_size)
    sync(args.device)
    return {"n": n, "mode": "end_to_end", "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}


def sharded(n: int, args: argparse.Namespace) -> dict:
    x = embeddings(n, args.dim).to(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    dist, idx = knn(x[: args.shard], x, k=args.k, chunk_size=args.chunk_size, self_index=torch.arange(args.shard))
    sync(args.device)
    shard_s = time.perf_counter() - t0
    # the detector stage on full-size [n, k] lists (the shard's rows tiled: the cost does not depend on values)
    reps = -(-n // args.shard)
    full_d, full_i = dist.repeat(reps, 1)[:n], idx.repeat(reps, 1)[:n]
    t1 = time.perf_counter()
    kdist_score(full_d), lid_score(full_d), slof_score(full_d, full_i), dao_score(full_d, full_i)
    sync(args.device)
    scores_s = time.perf_counter() - t1
    knn_s = shard_s * n / args.shard
    return {"n": n, "mode": "sharded", "shard": args.shard, "shard_seconds": shard_s,
            "knn_seconds_extrapolated": knn_s, "detector_seconds": scores_s,
            "seconds": knn_s + scores_s, "peak_rss_gib": peak_rss_gib()}


def subsampled(n: int, args: argparse.Namespace) -> dict:
    x = embeddings(n, args.dim).to(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    score_samples(x, DETECTORS, args.k, chunk_size=args.chunk_size, reference_size=args.reference_size,
                  reference_draws=args.reference_draws)
    sync(args.device)
    return {"n": n, "mode": "subsampled", "reference_size": args.reference_size,
            "reference_draws": args.reference_draws, "seconds": time.perf_counter() - t0,
            "peak_rss_gib": peak_rss_gib()}


def spread(n: int, args: argparse.Namespace, subsampled: bool = False) -> dict:
    """`score_samples` with its search spread over ``args.processes`` CPU processes (gloo, one thread each)."""
    import tempfile

    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # read by each spawned process's torch at import
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spread_process, args=(args.processes, n, args, subsampled, tmp), nprocs=args.processes,
                 join=True)
        return json.loads((Path(tmp) / "row.json").read_text())


def _spread_process(rank: int, world: int, n: int, args: argparse.Namespace, subsampled: bool, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        x = embeddings(n, args.dim)  # the same matrix in every process, as after scan_data's gather
        sub = {"reference_size": args.reference_size, "reference_draws": args.reference_draws} if subsampled else {}
        dist.barrier()
        t0 = time.perf_counter()
        search = ShardedSearch(rank, world)
        if not args.only_pair:
            score_samples(x, DETECTORS, args.k, chunk_size=args.chunk_size, search=search, **sub)
        dist.barrier()  # the slowest process's share counts
        seconds = None if args.only_pair else time.perf_counter() - t0
        pair = {}
        if args.pair:  # captions: another draw of the same kind, as scan-data holds both towers' embeddings
            text = embeddings(n, args.dim, seed=1)
            dist.barrier()
            t1 = time.perf_counter()
            score_samples(x, ("xgroup",), args.k, chunk_size=args.chunk_size, search=search, text_embeddings=text,
                          **sub)  # xmodal, then its caption groups
            dist.barrier()
            pair = {"pair_detectors": ["xmodal", "xgroup"], "pair_seconds": time.perf_counter() - t1}
        peaks: list = [None] * world
        dist.all_gather_object(peaks, peak_rss_gib())
        if rank == 0:
            row = {"n": n, "mode": "processes", "processes": world, "subsampled": subsampled, **sub,
                   "seconds": seconds, **pair, "peak_rss_gib": max(peaks)}
            (Path(tmp) / "row.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def markdown(rows: list[dict]) -> str:
    lines = ["| N | how | seconds | peak RSS (GiB) |", "|---|---|---|---|"]
    pair_rows = []
    for r in rows:
        if r["mode"] == "end_to_end":
            how = "exact over the whole set, measured end to end"
        elif r["mode"] == "processes":
            what = (f"against {r['reference_draws']} random subsamples of {r['reference_size']}" if r["subsampled"]
                    else "exact over the whole set")
            how = (f"{what}, spread over {r['processes']} CPU process{'es' if r['processes'] > 1 else ''} (1 thread "
                   "each), measured end to end")
        elif r["mode"] == "subsampled":
            how = (f"against {r['reference_draws']} random subsamples of {r['reference_size']} "
                   "(`reference_size`), measured end to end")
        else:
            how = (f"exact over the whole set: {r['shard']:,} x {r['n']:,} shard measured "
                   f"({r['shard_seconds']:.0f} s), x {r['n'] // r['shard']} for the full search; "
                   f"detector stage on [N, k] lists measured ({r['detector_seconds']:.1f} s)")
        if r["seconds"] is not None:
            lines.append(f"| {r['n']:,} | {how} | {r['seconds']:,.1f} | {r['peak_rss_gib']:.2f} |")
        if "pair_seconds" in r:
            pair_rows.append(f"| {r['n']:,} | {' and '.join(r['pair_detectors'])} on a caption matrix, same "
                             f"subsamples and processes | {r['pair_seconds']:,.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines + pair_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[20_000, 100_000])
    parser.add_argument("--large", nargs="*", type=int, default=[1_000_000])
    parser.add_argument("--shard", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subsampled", nargs="*", type=int, default=[1_000_000],
                        help="sizes scored end to end against subsamples (reference_size / reference_draws)")
    parser.add_argument("--reference_size", type=int, default=256)
    parser.add_argument("--reference_draws", type=int, default=8)
    parser.add_argument("--processes", type=int, default=0,
                        help="time the search spread over this many CPU processes at --sizes and --subsampled "
                             "(0: the one-process modes)")
    parser.add_argument("--pair", action="store_true",
                        help="with --processes: also time xmodal and xgroup on a caption matrix (pair_seconds)")
    parser.add_argument("--only_pair", action="store_true",
                        help="with --pair: time only the pair detectors (the kNN row's seconds stay empty)")
    parser.add_argument("--append", action="store_true", help="add the rows to those already in --out")
    parser.add_argument("--out", default="benchmarks/results/knn_scale.json")
    parser.add_argument("--markdown", action="store_true", help="only print the table of --out")
    args = parser.parse_args()
    args.pair = args.pair or args.only_pair
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return
    rows = json.loads(Path(args.out).read_text())["rows"] if args.append and Path(args.out).is_file() else []
    # Each size in a fresh process would isolate peak RSS; one process is kept simple, so sizes run smallest
    # first and the maximum RSS reported for a size is the maximum up to and including it.
    if args.processes > 0:
        for n, subsampled in [(n, False) for n in args.sizes] + [(n, True) for n in args.subsampled]:
            rows.append(spread(n, args, subsampled))
            print(rows[-1], flush=True)
        args.sizes, args.large, args.subsampled = [], [], []
    for n in args.sizes:
        rows.append(end_to_end(n, args))
        print(rows[-1], flush=True)
    for n in args.large:
        rows.append(sharded(n, args))
        print(rows[-1], flush=True)
    for n in args.subsampled:
        rows.append(subsampled(n, args))
        print(rows[-1], flush=True)
    meta = {"device": args.device, "threads": torch.get_num_threads(), "dim": args.dim, "k": args.k,
            "chunk_size": args.chunk_size, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
