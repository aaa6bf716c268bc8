"""Which loss a model family needs, read from open_clip's config files without importing open_clip (no torch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any


def _open_clip_config(name: str) -> dict[str, Any] | None:
    """open_clip's bundled config for `name`, read from its package files without importing it (no torch)."""
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "model_configs" / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def model_family(name: str, config: dict[str, Any] | None = None) -> str:
    """"clip", "siglip" (a learned logit bias: sigmoid loss) or "coca" (a captioning decoder), from the config."""
    cfg = config if config is not None else _open_clip_config(name)
    if cfg is None:
        return "coca" if name.lower().startswith("coca") else "clip"
    if "multimodal_cfg" in cfg:
        return "coca"
    if cfg.get("init_logit_bias") is not None:
        return "siglip"
    return "clip"
