"""Process-wide setup that belongs to the entry points (the CLI, the worker, the API), never to an import of core."""

from __future__ import annotations

import logging
import os


class RandomInitIsIntended(logging.Filter):
    """open_clip warns on the root logger whenever a model starts from random weights; here that is asked for
    (a base model about to be pretrained, a test), so the warning is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def configure_process() -> None:
    """Call once at start-up, before anything imports open_clip: weights are never fetched from a hub at run
    time unless the operator sets HF_HUB_OFFLINE=0 (huggingface_hub reads it at import), and open_clip's
    random-initialisation warning is filtered from the root logger."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = logging.getLogger()
    if not any(isinstance(f, RandomInitIsIntended) for f in root.filters):
        root.addFilter(RandomInitIsIntended())
