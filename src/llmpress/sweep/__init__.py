"""The compression limit: sweep, Pareto frontier, knee, mixed precision, report."""
from .driver import limit, summarize

__all__ = ["limit", "summarize"]
