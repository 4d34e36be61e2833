"""The command line of fpcd experiments: ``experiments/main.py`` and the installed ``fpcd`` command.

    python experiments/main.py --config=experiments/calo.py
    fpcd --config=experiments/gmm.py:tiny --config.train.num_steps=500 --mode=train
    ./launch.sh --local --processes 2 -- --config=experiments/gmm.py:tiny      # a 2-process job here

``--config`` is an ml-collections config file (``experiments/<name>.py``, optionally
``:variant``); any field can be overridden with ``--config.<field>=value``. ``--mode`` selects
``train``, ``distill``, ``sample``, ``eval``, ``all`` or ``generate`` (:func:`fpcd.runner.train_and_evaluate`; ``all``
distils when ``config.distill.rounds`` > 0). Training resumes from the newest checkpoint in
``--workdir``. Data-parallel over every device of every process (``jax.distributed`` when the
environment describes a multi-process job).

Expected failures end in one line ``error: ...`` on stderr (process 0 only) and exit status 1,
without a traceback: a bad flag, config file or override (an unknown field is named, with the
fields of its section), a bad config value, data error or refused workdir (another run's, or one
in use by a live run), a non-finite loss, a full disk ("no space left on device" and the path;
what was written before is intact). Any other exception is a bug and shows its traceback. Unless
``--verbosity`` is given, only warnings are logged, and orbax's tracebacks of a failed background
save are left out (the error itself is reported).

Importing this module defines absl's flags (``--config``, ``--workdir``, ``--mode``, ``--progress``);
:func:`run` parses ``sys.argv`` and runs :func:`main`.
"""


from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config.name>).")
_MODE = flags.DEFINE_enum("mode", "all", ("train", "distill", "sample", "eval", "all", "generate"),
                             "What to run.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

_PROCESS_INDEX = {"value": None}  # jax.process_index() once JAX is initialised


# config.experiment -> (module, class) of its Experiment subclass: the one registry of experiments
EXPERIMENTS = {
    "anomaly": ("fpcd.experiments.anomaly", "AnomalyExperiment"),
    "calo": ("fpcd.experiments.calo", "CaloExperiment"),
    "calochallenge": ("fpcd.experiments.calochallenge", "CaloChallengeExperiment"),
    "eic": ("fpcd.experiments.eic", "EicExperiment"),
    "gmm": ("fpcd.experiments.gmm", "GaussianMixtureExperiment"),
    "jetnet": ("fpcd.experiments.jetnet", "JetNetExperiment"),
}


def experiment_class(name: str):
    """The :class:`fpcd.runner.Experiment` subclass of ``config.experiment = name`` (only its module
    is imported); :class:`KeyError` for an unknown name."""
    module, attribute = EXPERIMENTS[name]
    return getattr(importlib.import_module(module), attribute)


def experiment_classes() -> dict:
    """``config.experiment`` -> its :class:`fpcd.runner.Experiment` subclass, for every experiment of
    :data:`EXPERIMENTS` (imports them all)."""
    return {name: experiment_class(name) for name in EXPERIMENTS}


def _process_index() -> int:
    """This process's index in a multi-process job (before JAX starts: from the launcher's environment)."""
    if _PROCESS_INDEX["value"] is not None:
        return _PROCESS_INDEX["value"]
    for name in ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_ID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def fail(message: str):
    """Print ``error: <message>`` as one line on stderr (process 0) and exit with status 1."""
    if _process_index() == 0:
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- flags and config file ------------------------------------------------------------------------


def _option_values(argv, name: str) -> list[str]:
    """The values given to ``--<name>`` in ``argv`` (``--name=value`` or ``--name value``), in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
        elif arg == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


def _overrides(argv) -> list[str]:
    """The dotted fields of every ``--config.<field>`` override in ``argv``."""
    fields = []
    for arg in argv:
        for prefix in ("--config.", "--noconfig."):
            if arg.startswith(prefix):
                fields.append(arg[len(prefix):].split("=", 1)[0])
    return fields


def load_config_file(spec: str):
    """The ConfigDict of ``path[:variant]``, built as ml_collections' ``config_flags`` builds it."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("fpcd_main_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def unknown_field_message(argv) -> str | None:
    """The message naming the first ``--config.<field>`` override of ``argv`` that the config file
    has no field for (with the fields of its section), or None."""
    import ml_collections

    specs = _option_values(argv, "config")
    try:
        cfg = load_config_file(specs[-1])
    except Exception:  # noqa: BLE001 - no config to compare with: the caller reports the original error
        return None
    for dotted in _overrides(argv):
        node, path = cfg, "config"
        for part in dotted.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)):
                return (f"--config.{dotted}: {path} is a value ({node!r}), not a section with fields; override "
                        f"it as --config.{path[len('config.'):]}=<value>")
            if part not in node:
                return (f"--config.{dotted}: unknown field '{part}' of {path} (fields cannot be added from the "
                        f"command line); {path} has the fields: {', '.join(sorted(node.keys()))}")
            node, path = node[part], f"{path}.{part}"
    return None


def _flag_error(err: Exception) -> str:
    """One line of an absl flags error (ml_collections puts the config file's traceback in it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv):
    """absl's flag parsing, every failure as one ``error:`` line (absl prints a usage banner, and an
    unknown ``--config.<field>`` raises from ml_collections with a traceback)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        if _overrides(argv) and not _option_values(argv, "config"):
            fail("--config is required before --config.<field> overrides, e.g. --config=experiments/gmm.py")
        fail(_flag_error(err))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:  # an override ml_collections could not apply
        fail(unknown_field_message(argv) or f"cannot apply the --config overrides ({type(err).__name__}: {err})")


def _config_or_fail():
    """``--config``'s ConfigDict, or one ``error:`` line when it is missing or its file cannot be loaded."""
    cfg = _CONFIG.value
    if cfg is None:
        fail("--config is required, e.g. --config=experiments/gmm.py")
    try:
        cfg.get("experiment")
    except OSError as err:  # ml_collections defers a failed load to the first use
        spec = (_option_values(sys.argv, "config") or [""])[-1]
        path = spec.partition(":")[0]
        if path and not os.path.exists(path):
            fail(f"--config={spec}: no such file {path}")
        fail(f"--config={spec}: cannot load the config file ({_flag_error(err)})")
    return cfg


class _OrbaxBackgroundTracebacks(std_logging.Filter):
    """Drops orbax's error records that carry a traceback: the failures of its background save
    threads, which orbax raises again in the caller (and :func:`main` reports)."""

    def filter(self, record):
        return not (record.levelno >= std_logging.ERROR and record.exc_info
                    and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every option is a --flag=value (see --helpshort)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        std_logging.getLogger("absl").addFilter(_OrbaxBackgroundTracebacks())
    cfg = _config_or_fail()

    from fpcd.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any other JAX call

    from fpcd.checkpoint import ignore_closed_loop_callbacks

    ignore_closed_loop_callbacks()  # an unreadable checkpoint's abandoned reads, after its one-line note

    import jax

    _PROCESS_INDEX["value"] = jax.process_index()

    from fpcd.parallel import data_mesh
    from fpcd.runner import expected_error_message, train_and_evaluate

    if cfg.get("experiment") not in EXPERIMENTS:
        fail(f"config.experiment={cfg.get('experiment')!r} is not one of {sorted(EXPERIMENTS)}")
    workdir = _WORKDIR.value or os.path.join("runs", cfg.get("name", cfg.experiment))
    try:
        experiment = experiment_class(cfg.experiment)(cfg, progress=_PROGRESS.value)
        train_and_evaluate(experiment, workdir, _MODE.value, data_mesh())
    except Exception as err:  # noqa: BLE001 - an expected error: one message, no traceback; others re-raised
        message = expected_error_message(err, workdir)
        if message is None:
            raise
        fail(message)


def run():
    """The ``fpcd`` console script and ``experiments/main.py``: parse the flags and run :func:`main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
