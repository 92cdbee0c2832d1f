"""The ``lmcloud`` commands (being written: see the next commits)."""

from __future__ import annotations


def register_license_text(db_url: str, text: str, source: str) -> str:
    """Record an issued license in the service's database; returns a one-line summary."""
    raise NotImplementedError("lmcloud register is not written yet")
