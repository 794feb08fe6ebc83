"""The compression limit: sweep, Pareto frontier, knee, mixed precision, report."""
from .sweep import limit, summarize

__all__ = ["limit", "summarize"]
