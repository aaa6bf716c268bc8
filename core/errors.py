"""The one domain exception family: raised on purpose in `core`, turned into a failed job or a 4xx at the edges."""

from __future__ import annotations


class HelipError(Exception):
    """A failure the user can act on: `code` is stable, `param` names the spec field at fault."""

    code = "helip_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


class SpecError(HelipError):
    """The job spec is invalid (wrong type, unknown field, impossible value)."""

    code = "invalid_spec"


class LocationError(SpecError):
    """A user-supplied location is refused (outside the allowed prefixes, a shell or network URL) or unreadable."""

    code = "invalid_location"


class DataError(HelipError):
    """The training or evaluation data cannot be used (too many bad samples, bad format)."""

    code = "data_error"


class ModelError(HelipError):
    """The model cannot be built or its weights cannot be loaded."""

    code = "model_error"


class StorageError(HelipError):
    """The object store failed (after retries)."""

    code = "storage_error"


class JobCancelled(HelipError):
    """The job was cancelled cooperatively; the latest checkpoint was saved."""

    code = "cancelled"
