"""`tokred eval`: accuracy and cost of tokred configurations on local tasks, as a table, JSON, CSV and a plot.

from tokred.eval import evaluate, grid
from tokred.zoo import load
model, processor = load("path/to/checkpoint")  # or a shipped name
rows = evaluate(model, processor, grid(["random", "fastv"], [0.5, 0.25]), ["shapes"], limit=100)
"""

from tokred.eval.report import table, write
from tokred.eval.runner import STOCK, Row, Setting, evaluate, grid
from tokred.eval.tasks import LOCAL_TASKS, questions

__all__ = ["LOCAL_TASKS", "STOCK", "Row", "Setting", "evaluate", "grid", "questions", "table", "write"]
