"""Evaluation: judges, the systems runner, metrics, attacks, delayed-awareness analysis and the report."""
