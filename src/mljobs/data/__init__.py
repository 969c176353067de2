"""Data for training: :class:`DataConnector` over pandas, polars, Arrow, SQL, files and Ray datasets."""

from __future__ import annotations

from mljobs.data.connector import DataConnector

__all__ = ["DataConnector"]
