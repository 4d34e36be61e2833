"""The single entry point of fpcd experiments.

    python experiments/main.py --config=experiments/calo.py
    python experiments/main.py --config=experiments/gmm.py:tiny --config.train.num_steps=500 --mode=train
    ./launch.sh --local --processes 2 -- --config=experiments/gmm.py:tiny      # a 2-process job here

``--config`` is an ml-collections config file (``experiments/<name>.py``, optionally
``:variant``); any field can be overridden with ``--config.<field>=value``. ``--mode`` selects
``train``, ``distill``, ``sample``, ``eval`` or ``all`` (:func:`fpcd.runner.train_and_evaluate`; ``all``
distils when ``config.distill.rounds`` > 0). Training
resumes from the newest checkpoint in ``--workdir``. Data-parallel over every device of every
process (``jax.distributed`` when the environment describes a multi-process job).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fpcd.parallel import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config.name>).")
_MODE = flags.DEFINE_enum("mode", "all", ("train", "distill", "sample", "eval", "all"), "What to run.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def experiment_classes() -> dict:
    """``config.experiment`` -> its :class:`fpcd.runner.Experiment` subclass (one literal dict)."""
    from fpcd.experiments.calo import CaloExperiment
    from fpcd.experiments.eic import EicExperiment
    from fpcd.experiments.gmm import GaussianMixtureExperiment
    from fpcd.experiments.jets import JetsExperiment

    return {"calo": CaloExperiment, "eic": EicExperiment, "gmm": GaussianMixtureExperiment, "jetnet": JetsExperiment}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=experiments/gmm.py")
    maybe_initialize_distributed()  # before any other JAX call

    import jax

    from fpcd.parallel import data_mesh
    from fpcd.runner import train_and_evaluate

    from fpcd.config import ConfigError
    from fpcd.data.calo import CaloDataError
    from fpcd.data.eic import EicDataError
    from fpcd.data.jetnet import JetDataError
    from fpcd.train import NonFiniteLossError

    classes = experiment_classes()
    if cfg.get("experiment") not in classes:
        raise app.UsageError(f"config.experiment={cfg.get('experiment')!r} is not one of {sorted(classes)}")
    experiment = classes[cfg.experiment](cfg, progress=_PROGRESS.value)
    workdir = _WORKDIR.value or os.path.join("runs", cfg.get("name", cfg.experiment))
    try:
        train_and_evaluate(experiment, workdir, _MODE.value, data_mesh())
    except (ConfigError, CaloDataError, EicDataError, JetDataError, NonFiniteLossError) as err:
        if jax.process_index() == 0:  # an expected error: one message, no traceback
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
