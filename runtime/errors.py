"""Typed errors the runtime raises when it refuses an input.

What it is for: one place for the error types shared across runtime modules, so
callers (the CLI, the gRPC layer) can map them to messages and status codes.
Not for: errors that belong to one module only (those live beside their code).
"""
from __future__ import annotations


class FieldError(ValueError):
    """A value is out of range or not allowed; `field` names it, the message gives the limit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name

