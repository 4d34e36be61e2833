"""The former name of :mod:`fpcd.experiments.jetnet` (the jets experiment, ``config.experiment =
"jetnet"``, configured by ``experiments/jetnet.py``); kept so that existing imports work."""

from fpcd.experiments.jetnet import *  # noqa: F401,F403
from fpcd.experiments.jetnet import JetNetExperiment as JetsExperiment  # noqa: F401
