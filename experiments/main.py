"""The single entry point of fpcd experiments.

    python experiments/main.py --config=experiments/gmm.py --workdir=runs/gmm --mode=all
    python experiments/main.py --config=experiments/gmm.py:tiny --config.train.num_steps=500

``--config`` is an ml-collections config file (``experiments/<name>.py``, optionally
``:variant``); any field can be overridden with ``--config.<field>=value``. ``--mode`` selects
``train``, ``sample``, ``eval`` or ``all``. Training resumes from the newest checkpoint in
``--workdir``. Data-parallel over every visible device (and every process, when the cluster
environment describes a multi-process job).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fpcd.parallel import data_mesh, maybe_initialize_distributed  # noqa: E402
from fpcd.pipelines import calo, gmm, jets  # noqa: E402

PIPELINES = {"calo": calo.run, "gmm": gmm.run, "jetnet": jets.run}
MODES = ("train", "sample", "eval", "all")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config.name>).")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "What to run.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=experiments/gmm.py")
    experiment = cfg.get("experiment")
    if experiment not in PIPELINES:
        raise app.UsageError(f"config.experiment={experiment!r} is not one of {sorted(PIPELINES)}")
    maybe_initialize_distributed()
    workdir = _WORKDIR.value or os.path.join("runs", cfg.get("name", experiment))
    result = PIPELINES[experiment](cfg, workdir, _MODE.value, data_mesh(), progress=_PROGRESS.value)
    if result is not None and "types" in result:
        print(f"results in {os.path.abspath(workdir)}")
        print(f"{'type':<5}{'run':<12}{'NFE':>6}{'jets/s':>9}{'W1M':>10}{'W1P':>10}{'W1EFP':>11}{'FPD':>10}{'KPD':>11}")
        for jet_type, row in result["types"].items():
            for name, r in [("floor", {**row["floor"], "nfe": 0, "jets_per_second": 0.0}), *row["runs"].items()]:
                print(f"{jet_type:<5}{name:<12}{r['nfe']:>6}{r['jets_per_second'] or 0:>9.1f}{r['w1m']:>10.5f}"
                      f"{r['w1p']:>10.5f}{r['w1efp']:>11.2e}{r['fpd']:>10.4f}{r['kpd']:>11.2e}")
    if result is not None and "representation" in result:
        print(f"results in {os.path.abspath(workdir)}")
        print(calo.format_results(result))
    elif result is not None and "runs" in result:
        print(f"results in {os.path.abspath(workdir)}")
        print(f"{'run':<12} {'NFE':>6} {'seconds':>8} {'W1 mean':>9}  (truth floor {result['floor']['w1_mean']:.4f})")
        for name, row in result["runs"].items():
            print(f"{name:<12} {row['nfe']:>6} {row['seconds']:>8.2f} {row['w1_mean']:>9.4f}")


if __name__ == "__main__":
    app.run(main)
