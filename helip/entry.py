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
    """Call once at start-up, before anything imports open_clip: the hub is offline unless the settings say
    otherwise (HELIP_HUB_OFFLINE=false; huggingface_hub reads HF_HUB_OFFLINE at import), the weights cache is
    where huggingface_hub keeps its files (HELIP_WEIGHTS_CACHE), and open_clip's random-initialisation warning
    is filtered from the root logger."""
    offline, cache = True, None
    try:
        from helip.settings import get_settings

        settings = get_settings()
        offline, cache = settings.hub_offline, settings.weights_cache
    except Exception:  # noqa: BLE001 - a misconfigured environment is reported by the command itself; stay offline
        pass
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    if cache is not None:
        os.environ.setdefault("HF_HUB_CACHE", str(cache))
    root = logging.getLogger()
    if not any(isinstance(f, RandomInitIsIntended) for f in root.filters):
        root.addFilter(RandomInitIsIntended())
