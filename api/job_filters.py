"""`GET /jobs?metadata.KEY=VALUE`: reading and bounding the metadata filters of the job list."""

from __future__ import annotations

from collections.abc import Iterable

from api.errors import ApiError
from core.spec import METADATA_KEY, METADATA_KEY_MAX, METADATA_MAX_KEYS, METADATA_VALUE_MAX

PREFIX = "metadata."
METADATA_FILTER_DOC = {"parameters": [{
    "name": "metadata.KEY", "in": "query", "required": False, "schema": {"type": "string"},
    "description": "only jobs whose metadata has KEY equal to this value (repeat with other keys: all must match); "
                   "KEY stands for the metadata key, e.g. `metadata.team=vision`",
}]}


def metadata_filters(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{KEY: VALUE} from the `metadata.KEY=VALUE` query parameters; a bad key, a long value, too many filters or
    the same key twice is a 422 naming the parameter."""
    out: dict[str, str] = {}
    for name, value in params:
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX):]
        if not METADATA_KEY.fullmatch(key) or len(key) > METADATA_KEY_MAX:
            raise ApiError(422, "invalid_request", f"{name[:80]}: a metadata key is 1-{METADATA_KEY_MAX} letters, "
                           "digits, _ . : or -", param=name[:80])
        if len(value) > METADATA_VALUE_MAX:
            raise ApiError(422, "invalid_request", f"{name}: longer than {METADATA_VALUE_MAX} characters", param=name)
        if key in out and out[key] != value:
            raise ApiError(422, "invalid_request", f"{name} is given twice with different values", param=name)
        out[key] = value
    if len(out) > METADATA_MAX_KEYS:
        raise ApiError(422, "invalid_request", f"at most {METADATA_MAX_KEYS} metadata filters", param="metadata")
    return out
