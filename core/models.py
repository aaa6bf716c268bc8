"""The one place that knows open_clip: build a model from a spec, load weights safely, save checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from core.errors import ModelError, SpecError
from core.io import Access, is_s3, read_bytes

_CONFIG_DIR = Path(tempfile.gettempdir()) / "helip-model-configs"


@dataclass
class LoadedModel:
    """A CLIP model with what it needs to read data: the train/eval transforms and the tokenizer."""

    name: str
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    pretrained: str | None


# open_clip's own architectures: the configs its package ships (not those registered in this process since).
_BUILTIN_MODELS = frozenset(p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json"))


def register_config(name: str, config: dict[str, Any], *, param: str = "model.config") -> None:
    """Register a custom open_clip model config under `name`, the way open_clip's own configs are found."""
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise SpecError("a model config needs embed_dim, vision_cfg and text_cfg (open_clip's schema)", param=param)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SpecError("model.name must be letters, digits, '-', '_' or '.' to register a config", param="model.name")
    if name in _BUILTIN_MODELS:
        # Registering over a built-in would change that architecture for every later job in this process.
        raise SpecError(f"'{name}' is a built-in open_clip architecture: give the custom config another name",
                        param="model.name")
    _CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    path = _CONFIG_DIR / f"{name}.json"
    text = json.dumps(config, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    open_clip.add_model_config(path)


def looks_like_tag(value: str) -> bool:
    """Whether a pretrained value has the shape of an open_clip tag rather than a location."""
    return not any(c in value for c in "./:~\\")


def _is_tag(name: str, pretrained: str) -> bool:
    return pretrained in open_clip.list_pretrained_tags_by_model(name)


def _fetch_weights(pretrained: str, access: Access, cache_dir: Path, param: str) -> str:
    """Resolve a pretrained value to a local file path; s3:// objects are downloaded once into cache_dir."""
    loc = access.check(pretrained, param=param)
    if is_s3(loc):
        cache_dir.mkdir(parents=True, exist_ok=True)
        dest = cache_dir / ("weights-" + hashlib.sha1(loc.encode()).hexdigest()[:16] + Path(loc).suffix)
        if not dest.exists():
            data = read_bytes(loc, access)
            tmp = dest.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(dest)
        return str(dest)
    path = loc[len("file://"):] if loc.startswith("file://") else loc
    if not Path(path).is_file():
        raise SpecError(f"checkpoint {pretrained} does not exist or is not a file", param=param)
    return path


def resolve_pretrained(name: str, pretrained: str | None, *, access: Access, cache_dir: Path,
                       param: str = "model.pretrained", weights_cache: Path | None = None) -> str | None:
    """A local checkpoint path for `pretrained`, or the open_clip tag when its weights are already cached
    (in `weights_cache`, default open_clip's own cache directory).

    Fails at once, before any work, when a tag's weights would have to be downloaded while offline.
    """
    if not pretrained:
        return None
    if pretrained.startswith(("hf-hub:", "http://", "https://")):
        raise SpecError(f"{param}: remote weights ({pretrained}) are not fetched; give a local path or s3:// object",
                        param=param)
    if _is_tag(name, pretrained):
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        try:
            return open_clip.download_pretrained(cfg, cache_dir=str(weights_cache) if weights_cache else None)
        except Exception as exc:  # huggingface_hub raises several types offline
            raise ModelError(
                f"the weights for open_clip tag '{pretrained}' of {name} are not cached on this machine and "
                f"cannot be downloaded (offline): put the checkpoint in an allowed location and give its path "
                f"or s3:// URL in {param} ({type(exc).__name__})",
                param=param,
            ) from None
    # A bare word is a tag (open_clip's tags have no '.', '/', ':' or '~'). The service never reads it as a file
    # relative to its working directory, which holds its own state; the local CLI still may.
    if looks_like_tag(pretrained) and (access.restricted or not Path(pretrained).exists()):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise SpecError(
            f"'{pretrained}' is neither a pretrained tag of {name} (known: {', '.join(tags) or 'none'}) nor a file",
            param=param,
        )
    return _fetch_weights(pretrained, access, cache_dir, param)


def load_model(name: str, *, config: dict[str, Any] | None = None, pretrained: str | None = None,
               access: Access | None = None, device: str | torch.device = "cpu",
               cache_dir: Path | None = None, param_prefix: str = "model",
               weights_cache: Path | None = None) -> LoadedModel:
    """Build an open_clip model by architecture name (or inline config) and load its weights."""
    access = access or Access()
    if name.startswith("hf-hub:"):
        return _load_from_hub(name, config=config, pretrained=pretrained, access=access, device=device,
                              param_prefix=param_prefix, weights_cache=weights_cache)
    if config is not None:
        register_config(name, config, param=f"{param_prefix}.config")
    if name not in open_clip.list_models():
        raise SpecError(f"unknown open_clip architecture '{name}' (give model.config for a custom one)",
                        param=f"{param_prefix}.name")
    path = resolve_pretrained(name, pretrained, access=access,
                              cache_dir=cache_dir or Path(tempfile.gettempdir()) / "helip-weights",
                              param=f"{param_prefix}.pretrained", weights_cache=weights_cache)
    try:
        # Without weights, initialise from a fixed seed: every load of the same spec is the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, pretrained=path, device=device, weights_only=True
            )
    except RuntimeError as exc:
        raise ModelError(f"cannot load weights {pretrained} into {name}: {str(exc).splitlines()[0][:300]}",
                         param=f"{param_prefix}.pretrained") from None
    except Exception as exc:  # an unpickling refusal, a corrupt zip, a wrong file type
        raise ModelError(f"{pretrained} is not a loadable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                         param=f"{param_prefix}.pretrained") from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except ImportError as exc:  # SigLIP's and HF text towers' tokenizers come from `transformers`
        raise ModelError(f"the tokenizer of {name} needs the Python package '{exc.name}', which is not installed "
                         f"on this worker", param=f"{param_prefix}.name") from None
    return LoadedModel(name, model, pre_train, pre_val, tokenizer, pretrained)


def _load_from_hub(name: str, *, config: dict[str, Any] | None, pretrained: str | None, access: Access,
                   device: str | torch.device, param_prefix: str, weights_cache: Path | None) -> LoadedModel:
    """An `hf-hub:org/repo` model: open_clip reads its config and weights from the repository, or from the
    weights cache when the hub is offline (HELIP_HUB_OFFLINE). Only prefixes the service allows."""
    if not access.model_allowed(name):
        raise SpecError(f"{name!r}: models from the Hugging Face hub are not allowed here (HELIP_ALLOWED_MODELS)",
                        param=f"{param_prefix}.name")
    if config is not None or pretrained:
        raise SpecError(f"{name!r} brings its own config and weights: leave {param_prefix}.config and "
                        f"{param_prefix}.pretrained empty", param=f"{param_prefix}.name")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, device=device, cache_dir=str(weights_cache) if weights_cache else None)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=str(weights_cache) if weights_cache else None)
    except Exception as exc:  # huggingface_hub raises several types when a file is neither cached nor reachable
        where = ("the hub is offline on this service (HELIP_HUB_OFFLINE) and the weights cache does not hold it"
                 if offline else "it could not be downloaded")
        raise ModelError(f"{name} cannot be loaded: {where} ({type(exc).__name__})", param=f"{param_prefix}.name") from None
    return LoadedModel(name, model, pre_train, pre_val, tokenizer, None)


def model_from_spec(spec_model, *, access: Access, device, cache_dir: Path | None = None,
                    weights_cache: Path | None = None) -> LoadedModel:
    """`load_model` for a `core.spec.ModelSpec`."""
    return load_model(spec_model.name, config=spec_model.config, pretrained=spec_model.pretrained,
                      access=access, device=device, cache_dir=cache_dir, weights_cache=weights_cache)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: Path, model: torch.nn.Module, *, name: str, extra: dict[str, Any] | None = None) -> Path:
    """Write an open_clip checkpoint ({"state_dict": ...}) atomically; loadable with pretrained=path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in unwrap(model).state_dict().items()}
    payload = {"state_dict": state, "name": name, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: Path) -> dict[str, Any]:
    """Load a checkpoint or training state with weights_only=True: never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a safe checkpoint ({type(exc).__name__})") from None


_TEXT_PARTS = ("token_embedding", "positional_embedding", "cls_emb", "transformer", "ln_final", "text_projection")


def prepare_for_training(model: Any, train_spec) -> list[str]:  # an open_clip model (lock_* methods)
    """Apply a TrainSpec's tower locks (open_clip's LiT options) and gradient checkpointing; say what was done."""
    notes = []
    if train_spec.lock_image:
        model.lock_image_tower(unlocked_groups=train_spec.lock_image_unlocked_groups,
                               freeze_bn_stats=train_spec.lock_image_freeze_bn_stats)
        notes.append(f"image tower locked ({train_spec.lock_image_unlocked_groups} last group(s) trainable)")
    if train_spec.lock_text:
        # open_clip's built-in text tower only supports freezing LayerNorms with the rest; open_clip's
        # "keep them trainable" option (its HF towers) is done here for every tower alike.
        model.lock_text_tower(unlocked_layers=train_spec.lock_text_unlocked_layers, freeze_layer_norm=True)
        if not train_spec.lock_text_freeze_layer_norm:
            text = getattr(model, "text", model)
            for part in _TEXT_PARTS:
                sub = getattr(text, part, None)
                if isinstance(sub, torch.nn.Module):
                    for m in sub.modules():
                        if isinstance(m, torch.nn.LayerNorm):
                            for p in m.parameters():
                                p.requires_grad = True
        notes.append(f"text tower locked ({train_spec.lock_text_unlocked_layers} last layer(s) trainable)")
    if train_spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
        notes.append("gradient checkpointing on")
    return notes
