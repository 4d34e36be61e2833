"""Experiment pipelines run by ``experiments/main.py``: one module per experiment kind."""
