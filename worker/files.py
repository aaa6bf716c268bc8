"""A job's files between the worker's workdir and the store: resume state up and back down, final artifacts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core.errors import StorageError
from core.guard import SELECTED_RUN
from helip import crud
from helip.store import Store, file_sha256, job_key

# What core.pipeline.run_job reuses from its workdir, by artifact name -> path inside the workdir.
# Evaluation caches (eval_<model>.json) are found by pattern, checkpoints come from the checkpoints table.
RESUME_FILES = {"embeddings": "embeddings.npz", "hard_pairs": "hard_pairs.parquet"}
EVAL_CACHE_GLOB = "eval_*.json"


@dataclass(frozen=True)
class Stored:
    key: str
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}


def _final_name(run: str) -> str:
    # the guard's selection is checkpoints/helip_selected.pt in the workdir and in the store alike
    return f"{run}.pt" if run == SELECTED_RUN else f"{run}_final.pt"


def checkpoint_key(job_id: str, run: str, step: int, *, final: bool) -> str:
    """Every training state keeps its own object (the checkpoints list links each); the final one is named so."""
    name = _final_name(run) if final else f"{run}_step{step:07d}.pt"
    return job_key(job_id, "checkpoints", name)


def checkpoint_workdir_path(workdir: Path, run: str, *, final: bool) -> Path:
    """Where core.train looks for a run's state (resume) or its final weights (training skipped)."""
    return Path(workdir) / "checkpoints" / (_final_name(run) if final else f"{run}_latest.pt")


def json_safe(value: Any) -> Any:
    """A copy that any JSON column accepts: NaN/inf become None, paths and other objects become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


class JobFiles:
    """Uploads a job's files once per version, records a row for each, and restores them into a new workdir."""

    def __init__(self, *, store: Store, sessions: sessionmaker[Session], job_id: str, workdir: Path):
        self.store = store
        self.sessions = sessions
        self.job_id = job_id
        self.workdir = Path(workdir)
        # (path, key) -> (mtime_ns, size, Stored): a file is uploaded again only when it changed.
        self._sent: dict[tuple[Path, str], tuple[int, int, Stored]] = {}

    def upload(self, path: Path, key: str) -> Stored:
        """Put `path` under `key` unless this very version is already there; StorageError when the store stays down."""
        path = Path(path)
        st = path.stat()
        seen = self._sent.get((path, key))
        if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size):
            return seen[2]
        sha, size = self.store.put_file(key, path)
        stored = Stored(key, sha, size)
        self._sent[(path, key)] = (st.st_mtime_ns, st.st_size, stored)
        return stored

    def _record(self, name: str, stored: Stored) -> None:
        with self.sessions() as session:
            crud.record_artifact(session, job_id=self.job_id, name=name, key=stored.key,
                                 sha256=stored.sha256, size=stored.size)
            session.commit()

    def resumable(self) -> dict[str, Path]:
        """The resume files present in the workdir now, by artifact name."""
        found = {name: self.workdir / rel for name, rel in RESUME_FILES.items() if (self.workdir / rel).is_file()}
        for path in sorted(self.workdir.glob(EVAL_CACHE_GLOB)):
            found[f"eval:{path.stem.removeprefix('eval_')}"] = path
        return found

    def sync(self) -> list[str]:
        """Upload resume files that are new or changed since the last sync, so another worker can pick up."""
        done = []
        for name, path in self.resumable().items():
            key = job_key(self.job_id, path.relative_to(self.workdir).as_posix())
            seen = self._sent.get((path, key))
            st = path.stat()
            if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size):
                continue
            self._record(name, self.upload(path, key))
            done.append(name)
        return done

    def restore(self) -> list[dict[str, Any]]:
        """Download what earlier attempts left (resume files, each run's newest checkpoint) into the workdir.

        Each file is checked against the sha256 recorded when it was uploaded: a corrupt state is refused
        rather than trained on.
        """
        with self.sessions() as session:
            artifacts = {a.name: Stored(a.key, a.sha256, a.size)
                         for a in crud.list_artifacts(session, job_id=self.job_id)}
            latest = crud.latest_checkpoints(session, job_id=self.job_id)
            checkpoints = {run: (ck.step, ck.final, Stored(ck.key, ck.sha256, ck.size)) for run, ck in latest.items()}
        wanted: list[tuple[str, Path, Stored, dict[str, Any]]] = []
        for name, rel in RESUME_FILES.items():
            if name in artifacts:
                wanted.append((name, self.workdir / rel, artifacts[name], {}))
        for name, stored in artifacts.items():
            if name.startswith("eval:"):
                wanted.append((name, self.workdir / f"eval_{name.removeprefix('eval:')}.json", stored, {}))
        for run, (step, final, stored) in checkpoints.items():
            dest = checkpoint_workdir_path(self.workdir, run, final=final)
            wanted.append((f"checkpoint:{run}", dest, stored, {"run": run, "step": step, "final": final}))
        restored = []
        for name, dest, stored, extra in wanted:
            self.store.get_file(stored.key, dest)
            sha, size = file_sha256(dest)
            if sha != stored.sha256:
                dest.unlink(missing_ok=True)
                raise StorageError(f"{stored.key} in the store does not match its recorded sha256 "
                                   f"({sha[:12]} != {stored.sha256[:12]}); refusing to resume from it")
            st = dest.stat()
            # Restored files are already in the store under these keys: do not upload them again.
            self._sent[(dest, stored.key)] = (st.st_mtime_ns, st.st_size, stored)
            restored.append({"name": name, "key": stored.key, "size": size, **extra})
        return restored

    def publish(self, artifacts: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Upload the job's final artifacts and record a row for each.

        A file's key is its path inside the workdir, the same key its checkpoint or resume upload used,
        so the final checkpoints and the hard pairs are not sent twice.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, path in artifacts.items():
            path = Path(path)
            rel = path.relative_to(self.workdir).as_posix() if path.is_relative_to(self.workdir) else path.name
            stored = self.upload(path, job_key(self.job_id, rel))
            self._record(name, stored)
            out[name] = stored.as_dict()
        return out
