"""Market clearing. A pure package: plain data in, an assignment out.

No database, no HTTP, no global state. ``broker`` adapts its rows to these
types; ``broker solve`` reads them from a market file.
"""

from solver.clearing import first_come_first_served, placeable, solve
from solver.market import Assignment, Job, Market, Offer, Result, Weights
from solver.relax import Warm

__all__ = [
    "Assignment",
    "Job",
    "Market",
    "Offer",
    "Result",
    "Warm",
    "Weights",
    "first_come_first_served",
    "placeable",
    "solve",
]
