"""The experiments run by ``experiments/main.py``: each module holds one
:class:`fpcd.runner.Experiment` subclass with only that experiment's hooks (data, stage models and
their conditioning, evaluation); :mod:`fpcd.runner` does the rest."""
