"""Sizes and spans written for people, one way for every place that shows them (the CLI, the
progress view, the dashboard)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_bytes", "format_duration"]


def format_bytes(n: Any) -> str:
    """``512 B``, ``1.5 KiB``, ``2.0 GiB``; empty for None."""
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """A span for people: ``4.2s``, ``42s``, ``1m 12s``, ``2h 05m``, ``3d 4h``."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"
