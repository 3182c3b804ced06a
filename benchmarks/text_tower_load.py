"""Time and peak memory of loading a whole ViT-L/14-sized CLIP checkpoint, whole and its text tower alone.

A scan reads only the text tower of a whole CLIP or SigLIP model (`lit_amdet.encoders.load_encoder`'s
``text_only``): openai/clip-vit-large-patch14, as downloaded, is a ``CLIPModel`` of 428 M parameters of which the
text tower and its projection are 124 M. This builds a checkpoint of that architecture with random weights (no
download here; timing and memory only), saves it as transformers does, and loads it in fresh processes, one
after the other, alternating, each printing its load's seconds and its own peak resident memory.

    python benchmarks/text_tower_load.py --folder runs/text_tower/vit-l14 \\
        --out benchmarks/results/text_tower_load.json

``--family openclip`` builds open_clip's own ViT-L-14 instead (the same sizes, 428 M parameters) and saves it as
an open_clip ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lit_amdet.io import write_json

#: The child's peak is its own memory's high-water mark (``VmHWM``), not ``getrusage``'s ``ru_maxrss``: Linux
#: starts a child's ``ru_maxrss`` at its parent's resident size when it forked, so a child of this script after
#: it built a 1.7 GB checkpoint reported the build's 2,390 MiB whatever it loaded (session 2026-12-07 (l)).
CHILD = """
import sys, time
t = time.perf_counter()
from lit_amdet.encoders import load_encoder
imported = time.perf_counter()
adapter = load_encoder(sys.argv[1], text_only=sys.argv[2] == "text")
done = time.perf_counter()
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"{done - imported} {sum(p.numel() for p in adapter.model.parameters())} {hwm}")
"""


def build(folder: Path) -> None:
    """openai/clip-vit-large-patch14's architecture (its config's sizes), random weights, saved by transformers."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                     "projection_dim": 768},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768},
        projection_dim=768)
    CLIPModel(config).save_pretrained(folder)
    from lit_amdet.tiny import build_hf_clip  # the CLIP tokenizer files beside it, as a download has them

    tokenizer_from = build_hf_clip(folder.parent / "tokenizer_source", arch="CLIPTextModel")
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (folder / f.name).write_bytes(f.read_bytes())


def build_openclip(folder: Path) -> None:
    """open_clip's ViT-L-14 (its registered config), random weights, as an open_clip ``local-dir`` folder; no
    tokenizer folder: the loader takes the CLIP BPE for a 49,408-token vocabulary, as for a download."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14", pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-L-14"),
                                                              "preprocess_cfg": {}}))


def load(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True,
                         check=True)
    seconds, params, peak_kib = out.stdout.split()
    return {"mode": mode, "seconds": round(float(seconds), 3), "parameters": int(params),
            "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="where the checkpoint is built (kept)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--family", choices=("clip", "openclip"), default="clip",
                        help="transformers' CLIPModel (default) or open_clip's CLIP")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.family == "openclip" and not (args.folder / "open_clip_config.json").is_file():
        build_openclip(args.folder)
    elif args.family == "clip" and not (args.folder / "config.json").is_file():
        build(args.folder)
    files = {p.name: p.stat().st_size for p in args.folder.iterdir() if p.suffix == ".safetensors"}
    runs = [load(args.folder, mode) for _ in range(args.repeats) for mode in ("whole", "text")]
    for r in runs:
        print(json.dumps(r))
    write_json(args.out, {"folder": str(args.folder), "family": args.family, "weights_bytes": files, "runs": runs})


if __name__ == "__main__":
    main()
