"""`GenerationError`: a generation request that cannot be served. It is a user error: the CLI
reports it in one line (`modlm.faults.USER_ERRORS` names this module)."""

from __future__ import annotations


class GenerationError(ValueError):
    """A generation request cannot be served; the message says why and what to change."""
