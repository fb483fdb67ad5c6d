"""Evaluation: FID, sFID, IS, precision/recall (ADM-comparable, `python -m evaluation`) and alignment analysis."""
