"""open_clip's registry (architectures and their pretrained tags) as a snapshot the API can read without torch.

The snapshot (`open_clip_registry.json`, next to this file) is generated from the installed open_clip by
`python -m helip.registry` and checked against it by the tests, so a new open_clip release that adds or
drops a name fails the tests until the snapshot is regenerated.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("open_clip_registry.json")


def generate() -> dict:
    """The registry of the installed open_clip (imports torch)."""
    import open_clip

    # open_clip's own configs (its package's model_configs/), not those a process registered at run time
    shipped = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    tags: dict[str, list[str]] = {m: [] for m in sorted(shipped)}
    for model, tag in open_clip.list_pretrained():
        if model in shipped:
            tags[model].append(tag)
    return {"open_clip": open_clip.__version__, "models": {m: sorted(t) for m, t in sorted(tags.items())}}


@lru_cache(maxsize=1)
def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def is_architecture(name: str) -> bool:
    return name in snapshot()["models"]


def tags_of(name: str) -> list[str]:
    return snapshot()["models"].get(name, [])


def close_names(name: str, n: int = 3) -> list[str]:
    """Architectures spelled like `name`, for a 'did you mean' in an error."""
    import difflib

    return difflib.get_close_matches(name, list(snapshot()["models"]), n=n, cutoff=0.75)


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT} ({len(snapshot.__wrapped__()['models'])} architectures)")
