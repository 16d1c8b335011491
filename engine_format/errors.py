"""The error an unusable engine directory raises.

What it is for: one type that names the file (and, where known, the field) of
an engine directory that cannot be used, shared by the loader and the builder.
Not for: errors about requests or configs (those live in `runtime/errors.py`).
"""
from __future__ import annotations


class EngineLoadError(RuntimeError):
    """An engine directory is unusable. Names the file and, where known, the field."""

    def __init__(self, file: str, message: str, field: str | None = None) -> None:
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + message)
        self.file = file
        self.field = field
