"""Sizes written for people, one way for every place that shows them (the CLI, the dashboard)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_bytes"]


def format_bytes(n: Any) -> str:
    """``512 B``, ``1.5 KiB``, ``2.0 GiB``; empty for None."""
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
