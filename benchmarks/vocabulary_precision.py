"""The typed-token probe's vocabulary passes in float32 and in bfloat16: the lists each makes, and their seconds.

    python benchmarks/vocabulary_precision.py --near DIR [DIR ...] --away DIR [DIR ...] --contexts A B
        [--anchor minilm] [--top 8] [--out benchmarks/results/vocabulary_precision.json]

Why: the passes (every vocabulary token typed alone, and into two short contexts, through suspect and anchor;
`lit_amdet.token_probe`) are the probe's largest cost, and they only pick the tokens to type (each typing near a
threshold is judged in float32: `benchmarks/typing_precision.py`). `vocabulary_precision: auto` runs them in bfloat16
where the device computes it natively; this is the measurement behind that default. Per suspect, back to back under
the same load, at each precision: the alone pass (`alone_shift`) and its alone and still lists, and for the
``--away`` suspects (those a scan makes the context list for: away from the anchor) the context list
(`agreeing_tokens`) in ``--contexts``. The anchor's passes are made
first at each precision and not timed (a scan reads them from the disk cache). The lists are compared as sets and
in order, with the largest difference of any token's shift and of the listed tokens' values.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lit_amdet.encoders import load_encoder
from lit_amdet.io import write_json
from lit_amdet.token_probe import (
    agreeing_tokens,
    alone_shift,
    anchor_alone_outputs,
    most_shifted,
    pass_dtype,
    still_tokens,
    vocabulary_precision,
)

COMPARED = ("float32", "bfloat16")
POSITION = 1  # the scan's default slot (`configs/scan.yaml`)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def lists(suspect, anchor, contexts: list[str], top: int) -> dict:
    """The probe's vocabulary lists of one suspect at the current precision (the context list with two
    ``contexts``), the alone pass's shifts, and the seconds of each pass."""
    shift, alone_s = timed(lambda: alone_shift(suspect, anchor, POSITION, disk_cache=False))
    out = {"alone": most_shifted(shift, top), "still": still_tokens(shift, top), "seconds_alone": alone_s,
           "shift": shift}
    if len(contexts) >= 2:
        out["context"], out["seconds_context"] = timed(
            lambda: agreeing_tokens(suspect, anchor, top, POSITION, contexts, disk_cache=False))
    return out


def compare(a: dict, b: dict, tokens) -> dict:
    """Float32's lists (``a``) against bfloat16's (``b``)."""
    row = {}
    for name in ("alone", "still", "context"):
        if name in a:
            x, y = dict(a[name]), dict(b[name])
            row[name] = {"float32": tokens(list(x)), "bfloat16": tokens(list(y)), "same_order": list(x) == list(y),
                         "overlap": len(x.keys() & y.keys()),
                         "max_value_difference": max((abs(x[i] - y[i]) for i in x.keys() & y.keys()), default=None)}
    finite = torch.isfinite(a["shift"]) & torch.isfinite(b["shift"])
    row["max_shift_difference"] = float((a["shift"] - b["shift"])[finite].abs().max())
    for key in ("seconds_alone", "seconds_context"):
        if key in a:
            row[key] = {"float32": a[key], "bfloat16": b[key], "speedup": a[key] / b[key]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near", nargs="*", default=[], help="suspects near the anchor: the alone pass only")
    parser.add_argument("--away", nargs="*", default=[], help="suspects away from it: also the context list")
    parser.add_argument("--contexts", nargs="*", default=[], help="the two contexts of the context list")
    parser.add_argument("--anchor", default="minilm")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/vocabulary_precision.json")
    args = parser.parse_args()
    anchor = load_encoder(args.anchor).eval()
    vocab = anchor.vocab_size
    for precision in COMPARED:  # the anchor's passes, once per precision, held in memory (not timed)
        with vocabulary_precision(precision):
            for context in ["", *args.contexts]:
                anchor_alone_outputs(anchor, POSITION, vocab, False, context=context)
    rows = {}
    for path, contexts in [(p, []) for p in args.near] + [(p, args.contexts) for p in args.away]:
        suspect = load_encoder(path).eval()
        made = {}
        for precision in COMPARED:
            with vocabulary_precision(precision):
                made[precision] = lists(suspect, anchor, contexts, args.top)
        rows[Path(path).name] = compare(made["float32"], made["bfloat16"], suspect.ids_to_tokens)
        print(Path(path).name, rows[Path(path).name], flush=True)
    write_json(Path(args.out), {"anchor": args.anchor, "contexts": args.contexts, "top": args.top,
                                "torch_threads": torch.get_num_threads(),
                                "auto_on_this_cpu": str(pass_dtype("cpu")), "suspects": rows})


if __name__ == "__main__":
    main()
