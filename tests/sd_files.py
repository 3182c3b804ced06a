"""Tiny Stable Diffusion containers for tests: diffusers pipeline folders and single files in the SD 1.x, SD 2.x
and SDXL key layouts, written from tiny models built by configs (`lit_amdet.tiny`); and a transformers
checkpoint saved in safetensors shards (`sharded`), as the hub's larger models come.

The single files are written with the inverse of the conversion `lit_amdet.encoders.formats` reads (open_clip's
fused ``in_proj`` rebuilt from q, k, v is never needed: the open_clip towers are real open_clip models, saved
with their own keys), so a test compares our loaded encoder with the original model's own forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lit_amdet import tiny
from lit_amdet.encoders.architectures import EncoderSpec

# 64-wide heads, as every SD text encoder (the single-file loader derives the head count from the width)
TEXT = {"width": 64, "heads": 1, "layers": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def clip_text(path: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPTextModel (ViT-L's place in SD 1.x and SDXL) saved natively."""
    return tiny.build_hf_clip(path, arch="CLIPTextModel", seed=seed, **TEXT)


def open_clip_model(seed: int = 1, layers: int = 3):
    """A tiny open_clip CLIP (the OpenCLIP ViT-H / bigG place in SD 2.x and SDXL)."""
    return EncoderSpec(family="open_clip", seed=seed, **{**TEXT, "layers": layers}).build().model.eval()


def _hf_keys(folder: Path) -> dict[str, torch.Tensor]:
    """A saved CLIPTextModel's weights under the ``text_model.`` names SD checkpoints carry (transformers 4)."""
    state = load_file(str(folder / "model.safetensors"))
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _open_clip_keys(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("visual.") and k != "attn_mask"}


def _filler() -> dict[str, torch.Tensor]:
    # the UNet and VAE stand-in: never to be read by the loader
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
            "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3)}


def write_single_file(path: Path, parts: dict[str, dict[str, torch.Tensor]], pad_mib: int = 0) -> Path:
    """``parts``: key prefix -> tensors under it; plus the UNet/VAE stand-in, and with ``pad_mib`` a float32 tensor
    of that many MiB after every other tensor's bytes (`pad_safetensors`)."""
    state = _filler()
    for prefix, tensors in parts.items():
        state.update({prefix + k: v.contiguous() for k, v in tensors.items()})
    save_file(state, str(path))
    if pad_mib:
        pad_safetensors(path, "model.diffusion_model.padding", pad_mib)
    return path


def pad_safetensors(path: Path, key: str, mib: int) -> None:
    """Append a zero float32 tensor ``key`` of ``mib`` MiB to a safetensors file as a hole (a sparse file): a
    file as large as a UNet-padded checkpoint that takes no disk (the suite once ran CI out of /tmp). Its bytes
    read as zeros, so a loader that reads them still pays the memory the test measures."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    header[key] = {"dtype": "F32", "shape": [mib * 2**18], "data_offsets": [len(data), len(data) + mib * 2**20]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format's 8-byte alignment of the data
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + data)
        f.truncate(8 + len(encoded) + len(data) + mib * 2**20)


def sd1_file(path: Path, clip_dir: Path, pad_mib: int = 0) -> Path:
    return write_single_file(path, {"cond_stage_model.transformer.": _hf_keys(clip_dir)}, pad_mib)


def sd2_file(path: Path, model, pad_mib: int = 0) -> Path:
    return write_single_file(path, {"cond_stage_model.model.": _open_clip_keys(model)}, pad_mib)


def sdxl_file(path: Path, clip_dir: Path, model, pad_mib: int = 0) -> Path:
    return write_single_file(path, {"conditioner.embedders.0.transformer.": _hf_keys(clip_dir),
                                    "conditioner.embedders.1.model.": _open_clip_keys(model)}, pad_mib)


def pipeline(path: Path, encoders: dict[str, Path], classes: dict[str, str] | None = None) -> Path:
    """A diffusers pipeline folder: ``encoders`` maps text_encoder / text_encoder_2 to a saved CLIP text model,
    whose tokenizer goes to the sibling tokenizer / tokenizer_2; a UNet stand-in and a scheduler beside them."""
    path.mkdir(parents=True)
    classes = classes or {}
    index = {"_class_name": "StableDiffusionXLPipeline" if len(encoders) > 1 else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None]}
    for component, source in encoders.items():
        tokenizer = "tokenizer" + component.removeprefix("text_encoder")
        (path / component).mkdir()
        (path / tokenizer).mkdir()
        for f in source.iterdir():
            shutil.copy(f, path / (tokenizer if f.name in TOKENIZER_FILES else component) / f.name)
        index[component] = ["transformers", classes.get(component, "CLIPTextModel")]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    (path / "unet").mkdir()
    save_file(_filler(), str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    (path / "unet" / "config.json").write_text("{}")
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text("{}")
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def sharded(source: Path, folder: Path, shard_size: str = "40KB") -> Path:
    """``source`` (a transformers checkpoint folder) saved by transformers itself in safetensors shards (its
    ``model.safetensors.index.json`` and ``model-0000i-of-n.safetensors``), its tokenizer and configs beside."""
    import transformers

    arch = json.loads((source / "config.json").read_text())["architectures"][0]
    getattr(transformers, arch).from_pretrained(source).save_pretrained(folder, max_shard_size=shard_size)
    for f in source.iterdir():
        if not (folder / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("model-*.safetensors"))) > 1
    return folder
