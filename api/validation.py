"""Request-time checks of a job's locations: allowed, and present (cheap: one stat or listing per location).

Two phases. The access rules (allowed and denied prefixes, brace patterns) are pure computation, bounded
by the pattern limits of core.braces. The existence checks touch a disk or an S3 server, so they run in
worker threads under one time budget: a slow store costs the request at most that budget, never a
thread of the server held indefinitely by the request itself. Reading a whole data set is the worker's
job (core.data.build_index); here we only stat the CSV file or the first webdataset shard, list an
ImageFolder root, and stat a checkpoint file.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from api.errors import ApiError
from core.braces import BracePattern
from core.errors import LocationError
from core.io import Access, list_dir, stat_size
from core.spec import JobSpec, spec_locations

# Fields whose location is an ImageFolder root (a directory or s3 prefix), not a file.
_FOLDER_SUFFIXES = (".root", ".train", ".test")


def _is_folder_field(field: str) -> bool:
    return field.startswith(("eval.zeroshot.", "eval.linear_probe.")) and field.endswith(_FOLDER_SUFFIXES)


def _exists(field: str, location: str, access: Access) -> None:
    if _is_folder_field(field):
        if not list_dir(location, access, param=field):
            raise LocationError(f"{location!r} is an empty folder (expected one sub-folder per class)", param=field)
        return
    first = BracePattern(location, param=field).first() if "{" in location else location
    stat_size(first, access, param=field)


def check_locations(spec: JobSpec, access: Access, *, budget_seconds: float = 10.0) -> None:
    """Raise LocationError (param = the spec field) for a location that is refused or does not exist, or a 503
    naming the field whose check did not finish within `budget_seconds`."""
    fields = spec_locations(spec)
    for field, location in fields:
        access.check(location, param=field)
    deadline = time.monotonic() + budget_seconds
    pool = ThreadPoolExecutor(max_workers=min(4, len(fields)) or 1, thread_name_prefix="location-check")
    try:
        futures = [(field, pool.submit(_exists, field, location, access)) for field, location in fields]
        for field, future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise ApiError(503, "location_check_timeout",
                               f"{field}: the location could not be checked within {budget_seconds:g} s; "
                               "retry later", param=field, headers={"Retry-After": "5"}) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
