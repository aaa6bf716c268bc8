"""The bounds and value checks every job spec field shares: finite numbers, no NUL, bounded strings, names,
maps and custom model configs (a 422 naming the field, never a run with absurd values)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

# Bounds that no real job needs to exceed: they keep a hostile or mistyped value from holding a worker.
MAX_STRING = 4096  # any string in the spec (locations, templates, names)
MAX_NAME = 128  # data set names: they become metric keys and database values
MAX_STEPS = 10_000_000
NEVER = 1_000_000_000  # an interval (checkpoint_every, log_every) this large means "not during the run"
MAX_BATCH = 1 << 20
MAX_CONFIG_DEPTH = 6
MAX_CONFIG_NODES = 2000
MAX_CONFIG_PARAMS = 10_000_000_000  # an estimate of a custom model's parameters (the largest open_clip: 5B)


def _check_value(value: Any, where: str = "") -> None:
    """Refuse NUL characters and over-long strings anywhere in a field's value (lists, maps and their keys
    included). Iterative: a deeply nested value is walked without recursion."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise ValueError(f"{at or 'value'} contains a NUL character")
            if len(v) > MAX_STRING:
                raise ValueError(f"{at or 'value'} is longer than {MAX_STRING} characters")
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{at}[{i}]" if at else f"item {i}") for i, x in enumerate(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, f"a key of {at or 'the map'}"))
                stack.append((x, f"{at}.{k}" if at else str(k)))


NAME_MAX, METADATA_MAX_KEYS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 200, 32, 64, 512
METADATA_KEY = re.compile(r"[A-Za-z0-9_.:-]+")


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """Job metadata within its bounds (key count, key characters and length, value length), else ValueError."""
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys, got {len(value)}")
    for key, val in value.items():
        if not METADATA_KEY.fullmatch(key) or len(key) > METADATA_KEY_MAX:
            raise ValueError(f"key {key[:80]!r} must be 1-{METADATA_KEY_MAX} letters, digits, _ . : or -")
        if len(val) > METADATA_VALUE_MAX:
            raise ValueError(f"the value of {key!r} is longer than {METADATA_VALUE_MAX} characters")
    return value


class Strict(BaseModel):
    # allow_inf_nan=False: NaN and Infinity are a 422 naming the field, never a training run with null losses.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _safe_values(cls, value: Any) -> Any:
        _check_value(value)
        return value


def _dataset_name(value: str) -> str:
    if not value or len(value) > MAX_NAME or any(c in value for c in "/\\") or not value.isprintable():
        raise ValueError(f"a data set name is 1 to {MAX_NAME} printable characters without '/' or '\\'")
    return value


DatasetName = Annotated[str, AfterValidator(_dataset_name)]


def check_model_config(config: dict[str, Any]) -> None:
    """A custom open_clip config: JSON values only, finite, bounded in depth and size, and a model of a size that
    a worker can hold (a rough parameter estimate: 12 x layers x width^2 per tower plus the token embedding)."""
    nodes = 0

    def walk(v: Any, path: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ValueError(f"model.config has more than {MAX_CONFIG_NODES} values")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"model.config is nested deeper than {MAX_CONFIG_DEPTH} levels (at {path})")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or not k or len(k) > MAX_NAME or "\x00" in k:
                    raise ValueError(f"model.config has an invalid key at {path or 'the top'}")
                walk(x, f"{path}.{k}" if path else k, depth + 1)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, (int, float)):
            if not math.isfinite(v) or abs(v) > 1e7:
                raise ValueError(f"model.config.{path} must be a finite number of magnitude at most 1e7")
        elif isinstance(v, str):
            _check_value(v, f"model.config.{path}")
        else:
            raise ValueError(f"model.config.{path} is not a JSON value")

    walk(config, "", 0)
    params = 0.0
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config.get(tower)
        if not isinstance(cfg, dict):
            continue
        width, layers = cfg.get("width", 0), cfg.get("layers", 0)
        layers = sum(x for x in layers if isinstance(x, (int, float))) if isinstance(layers, list) else layers
        if isinstance(width, (int, float)) and isinstance(layers, (int, float)):
            params += 12.0 * max(layers, 0) * float(width) ** 2
            if tower == "text_cfg" and isinstance(cfg.get("vocab_size", 0), (int, float)):
                params += float(cfg.get("vocab_size", 0)) * float(width)
    if params > MAX_CONFIG_PARAMS:
        raise ValueError(f"model.config describes a model of about {params:.2g} parameters; at most "
                         f"{MAX_CONFIG_PARAMS:.0e} are accepted")
