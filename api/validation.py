"""Submit-time checks of a job beyond its schema: the model against open_clip's registry, and its locations
(allowed, present, and of a format the worker reads).

Two phases. The rules (registry names, allowed and denied prefixes, brace patterns, formats) are pure
computation, bounded by the limits of core.braces. The probes touch a disk or an S3 server (one stat or
listing per location, a CSV's header line, the first shard's first sample), so they run in worker threads
under one time budget: a slow store costs the request at most that budget. Reading a whole data set
is the worker's job; a job that passes here can still fail there, but not for any reason checked here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

from api.errors import ApiError
from api.probes import check_csv_columns, check_first_sample, data_format
from core.braces import BracePattern
from core.errors import DataError, LocationError, SpecError
from core.io import Access, list_dir, stat_size
from core.spec import JobSpec, spec_locations
from helip import registry

# Fields whose location is an ImageFolder root (a directory or s3 prefix), not a file.
_FOLDER_SUFFIXES = (".root", ".train", ".test")


def _is_folder_field(field: str) -> bool:
    return field.startswith(("eval.zeroshot.", "eval.linear_probe.")) and field.endswith(_FOLDER_SUFFIXES)


def _is_tag(value: str) -> bool:
    """A pretrained value with the shape of an open_clip tag (tags have no '.', '/', ':', '~' or '\\')."""
    return not any(c in value for c in "./:~\\")


def check_model(spec: JobSpec, *, allowed_models: tuple[str, ...] = ()) -> None:
    """The architecture and pretrained tag exist in open_clip's registry (or are an allowed hf-hub model)."""
    _check_architecture(spec.model.name, spec.model.config is not None, spec.model.pretrained, "model",
                        allowed_models)
    if (spec.mining.encoder_pretrained or "").startswith("hf-hub:"):
        raise SpecError(f"{spec.mining.encoder_pretrained!r}: a hub model is given as mining.encoder (open_clip "
                        "loads its config and weights from the repository)", param="mining.encoder_pretrained")
    if spec.mining.encoder not in ("self", spec.model.name):  # the model's own (maybe custom) architecture
        _check_architecture(spec.mining.encoder, False, spec.mining.encoder_pretrained, "mining.encoder",
                            allowed_models, pretrained_param="mining.encoder_pretrained", name_param="mining.encoder")


def _check_architecture(name: str, custom: bool, pretrained: str | None, prefix: str, allowed_models: tuple[str, ...],
                        *, pretrained_param: str | None = None, name_param: str | None = None) -> None:
    name_param = name_param or f"{prefix}.name"
    pretrained_param = pretrained_param or f"{prefix}.pretrained"
    if (pretrained or "").startswith("hf-hub:"):
        raise SpecError(f"{pretrained!r}: a hub model is given as {name_param} (open_clip loads its config and "
                        "weights from the repository); leave the pretrained value empty", param=pretrained_param)
    for value, param in ((name, name_param),):
        if value.startswith("hf-hub:") and not any(value.startswith(p) for p in allowed_models):
            raise SpecError(f"{value!r}: models from the Hugging Face hub are not allowed on this service "
                            "(HELIP_ALLOWED_MODELS lists the hf-hub: prefixes that are)", param=param)
    if name.startswith("hf-hub:"):
        return
    if custom:
        if registry.is_architecture(name):
            raise SpecError(f"{name!r} is a built-in open_clip architecture: give the custom config another name",
                            param=name_param)
        if pretrained and _is_tag(pretrained):
            raise SpecError(f"{pretrained!r}: a custom architecture has no pretrained tags; give a checkpoint "
                            "location", param=pretrained_param)
        return
    if not registry.is_architecture(name):
        close = registry.close_names(name)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (give model.config for a custom one)"
        raise SpecError(f"unknown open_clip architecture {name!r}{hint}", param=name_param)
    if pretrained and _is_tag(pretrained) and pretrained not in registry.tags_of(name):
        tags = registry.tags_of(name)
        raise SpecError(f"{pretrained!r} is not a pretrained tag of {name} (its tags: {', '.join(tags) or 'none'}); "
                        "or give a checkpoint location", param=pretrained_param)


def _probes(spec: JobSpec, access: Access) -> list[tuple[str, Callable[[], None]]]:
    """(field, probe) for every location: existence, and for data, the format the worker will read."""
    probes: list[tuple[str, Callable[[], None]]] = []
    csv_keys = {"data.train": (spec.data.csv_separator, spec.data.csv_img_key, spec.data.csv_caption_key)}
    for i, r in enumerate(spec.eval.retrieval):
        csv_keys[f"eval.retrieval.{i}.data"] = (r.csv_separator or spec.data.csv_separator,
                                                r.csv_img_key or spec.data.csv_img_key,
                                                r.csv_caption_key or spec.data.csv_caption_key)
    for field, location in spec_locations(spec):
        if _is_folder_field(field):
            probes.append((field, partial(_non_empty_folder, field, location, access)))
            continue
        first = BracePattern(location, param=field).first() if "{" in location else location
        if field in csv_keys:
            if data_format(location) == "csv":
                sep, img, cap = csv_keys[field]
                probes.append((field, partial(check_csv_columns, first, access, separator=sep, img_key=img,
                                              caption_key=cap, param=field)))
            else:
                probes.append((field, partial(check_first_sample, first, access, param=field)))
        else:
            probes.append((field, partial(_exists, first, access, field)))
    return probes


def _exists(location: str, access: Access, field: str) -> None:
    stat_size(location, access, param=field)


def _non_empty_folder(field: str, location: str, access: Access) -> None:
    if not list_dir(location, access, param=field):
        raise LocationError(f"{location!r} is an empty folder (expected one sub-folder per class)", param=field)


def check_locations(spec: JobSpec, access: Access, *, budget_seconds: float = 10.0) -> None:
    """Raise LocationError/DataError (param = the spec field) for a location that is refused, missing or of a
    format the worker cannot read, or a 503 naming the field whose check did not finish within the budget."""
    fields = spec_locations(spec)
    for field, location in fields:
        access.check(location, param=field)
        if field == "data.train" or (field.startswith("eval.retrieval.") and field.endswith(".data")):
            try:
                data_format(location)
            except DataError as exc:
                raise DataError(exc.message, param=field) from None
    probes = _probes(spec, access)
    deadline = time.monotonic() + budget_seconds
    pool = ThreadPoolExecutor(max_workers=min(4, len(probes)) or 1, thread_name_prefix="location-check")
    try:
        futures = [(field, pool.submit(probe)) for field, probe in probes]
        for field, future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise ApiError(503, "location_check_timeout",
                               f"{field}: the location could not be checked within {budget_seconds:g} s; "
                               "retry later", param=field, headers={"Retry-After": "5"}) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
