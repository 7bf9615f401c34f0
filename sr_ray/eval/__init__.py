"""Evaluation (judged by `sr_ray.judges`): the systems runner, metrics, attacks, delayed-awareness analysis and the report."""
