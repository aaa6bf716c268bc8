"""Request-time checks of a job's locations: allowed, and present (cheap: one stat or listing per location).

Reading a whole data set is the worker's job (core.data.build_index); here we only stat the CSV file or the
first webdataset shard, list an ImageFolder root, and stat a checkpoint file.
"""

from __future__ import annotations

from core.errors import LocationError
from core.io import Access, expand_braces, list_dir, stat_size
from core.spec import JobSpec, spec_locations

# Fields whose location is an ImageFolder root (a directory or s3 prefix), not a file.
_FOLDER_SUFFIXES = (".root", ".train", ".test")


def _is_folder_field(field: str) -> bool:
    return field.startswith(("eval.zeroshot.", "eval.linear_probe.")) and field.endswith(_FOLDER_SUFFIXES)


def check_locations(spec: JobSpec, access: Access) -> None:
    """Raise LocationError (param = the spec field) for a location that is refused or does not exist."""
    for field, location in spec_locations(spec):
        access.check(location, param=field)
        if _is_folder_field(field):
            if not list_dir(location, access, param=field):
                raise LocationError(f"{location!r} is an empty folder (expected one sub-folder per class)",
                                    param=field)
            continue
        first = expand_braces(location, param=field)[0] if "{" in location else location
        stat_size(first, access, param=field)
