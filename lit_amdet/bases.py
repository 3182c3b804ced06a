"""Build the world's pretrained bases (CLIP, SigLIP, LongCLIP, open_clip) and measure their realism.

    python -m lit_amdet.bases [--cache .cache/bases] [--only clip siglip] [--force]

Each base is trained by ``lit-amdet fit --config configs/pretrain_<name>.yaml``
into ``<cache>/<name>`` and skipped when that folder already holds a model.
Realism is then measured on held-out world pairs (a world seed never used in
training) and written to ``<cache>/<name>/realism.json``:
text->image recall@1/@5 among 100 candidates, the clean-prompt Sim_X
distribution, training minutes and parameter count.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_amdet.assimilation import assimilation_score, scored_positions
from lit_amdet.encoders import TextEncoderAdapter, load_encoder
from lit_amdet.metrics import recall_at_k
from lit_amdet.record import TRAINING_INFO
from lit_amdet.resources import config_path

BASES = ("clip", "siglip", "longclip", "openclip")
HELD_OUT_WORLD_SEED = 424242


def base_ready(folder: Path) -> bool:
    return (folder / TRAINING_INFO).is_file()


def build_base(name: str, cache: Path, extra_args: list[str] | None = None, force: bool = False) -> Path:
    """Train one base with its config unless the cache already has it."""
    from lit_amdet.cli import main

    out = cache / name
    if base_ready(out) and not force:
        return out
    config = config_path(f"pretrain_{name}.yaml")
    main(["fit", "--config", str(config), "--model.init_args.output_dir", str(out),
          "--trainer.default_root_dir", str(cache / "runs" / name), *(extra_args or [])])  # the logs under it too
    return out


@torch.no_grad()
def measure_realism(adapter: TextEncoderAdapter, n_pairs: int = 1000, candidates: int = 100,
                    image_size: int | None = None, long_captions: int = 1, max_length: int | None = None,
                    batch_size: int = 100) -> dict:
    """Held-out retrieval and clean Sim_X of a world base."""
    from lit_amdet.datamodules import TextEncoderDataModule

    adapter.eval()
    size = image_size or getattr(getattr(adapter.model, "config", None), "vision_config", None)
    size = size.image_size if hasattr(size, "image_size") else (image_size or 32)
    dm = TextEncoderDataModule(num_samples=n_pairs, world_seed=HELD_OUT_WORLD_SEED, image_size=size,
                               long_captions=long_captions, max_length=max_length, batch_size=batch_size,
                               val_fraction=0)
    dm.attach_encoder(adapter)
    texts, images, sims = [], [], []
    for batch in dm.predict_dataloader():
        out = adapter.encode(batch["tokens"])
        texts.append(out.pooled.float())
        images.append(adapter.encode_image(batch["pixel_values"]).float())
        sims.append(assimilation_score(out.token_features.float(), scored_positions(out.token_mask, adapter.causal)))
    text, image, sim = torch.cat(texts), torch.cat(images), torch.cat(sims)
    t2i = recall_at_k(text, image, ks=(1, 5), block=candidates)
    i2t = recall_at_k(image, text, ks=(1, 5), block=candidates)
    q = torch.quantile(sim, torch.tensor([0.1, 0.5, 0.9]))
    return {
        "pairs": int(text.shape[0]),
        "candidates": candidates,
        "t2i_recall@1": t2i[1], "t2i_recall@5": t2i[5],
        "i2t_recall@1": i2t[1], "i2t_recall@5": i2t[5],
        "sim_x_mean": float(sim.mean()), "sim_x_p10": float(q[0]), "sim_x_p50": float(q[1]),
        "sim_x_p90": float(q[2]),
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "text_parameters": _text_parameters(adapter),
    }


def _text_parameters(adapter: TextEncoderAdapter) -> int:
    vision = ("vision_model.", "visual_projection", "visual.", "logit_")
    return sum(p.numel() for n, p in adapter.model.named_parameters() if not n.startswith(vision))


def realism(name: str, folder: Path) -> dict:
    info = json.loads((folder / TRAINING_INFO).read_text())
    long = 2 if name == "longclip" else 1  # as configs/pretrain_longclip.yaml
    adapter = load_encoder(folder)
    res = measure_realism(adapter, long_captions=long, max_length=80 if long > 1 else 40)
    res.update(base=name, family=adapter.family, steps=info.get("steps"),
               train_minutes=(info.get("seconds") or 0) / 60)
    (folder / "realism.json").write_text(json.dumps(res, indent=2))
    return res


def markdown_table(rows: list[dict]) -> str:
    head = ("| base | family | params (text) | steps | train min | t→i R@1 / R@5 (of 100) | i→t R@1 | "
            "clean Sim_X mean (p10/p50/p90) |\n|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['base']} | {r['family']} | {r['parameters'] / 1e6:.1f} M ({r['text_parameters'] / 1e6:.1f} M) | "
        f"{r['steps']} | {r['train_minutes']:.1f} | {r['t2i_recall@1']:.2f} / {r['t2i_recall@5']:.2f} | "
        f"{r['i2t_recall@1']:.2f} | {r['sim_x_mean']:.2f} ({r['sim_x_p10']:.2f}/{r['sim_x_p50']:.2f}/"
        f"{r['sim_x_p90']:.2f}) |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or reuse) the world's pretrained bases")
    parser.add_argument("--cache", default=".cache/bases", help="folder holding one sub-folder per base")
    parser.add_argument("--only", nargs="*", choices=BASES, default=list(BASES))
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args, extra = parser.parse_known_args(argv)
    cache = Path(args.cache)
    rows = []
    for name in args.only:
        t0 = time.perf_counter()
        folder = build_base(name, cache, extra, args.force)
        rows.append(realism(name, folder))
        print(f"{name}: ready in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
