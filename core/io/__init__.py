"""Reading user data safely: the access rules, location strings, local and S3 reads (one module each).

    access.py     what a job may read (allowed prefixes, the service's own state denied, brace patterns)
    locations.py  location strings: schemes, join, dirname, s3://bucket/key
    local.py      local files: checked opens, the per-process descriptor cache
    read.py       open_binary, read_range, read_bytes, stat_size, list_dir
Brace patterns live in core.braces, the S3 client and its retry policy in core.s3.
"""

from core.braces import BracePattern, expand_braces
from core.io.access import Access
from core.io.locations import dirname, is_s3, join, split_s3
from core.io.read import list_dir, open_binary, read_bytes, read_range, stat_size
from core.s3 import S3Config, s3_client

__all__ = ["Access", "BracePattern", "S3Config", "dirname", "expand_braces", "is_s3", "join", "list_dir",
           "open_binary", "read_bytes", "read_range", "s3_client", "split_s3", "stat_size"]
