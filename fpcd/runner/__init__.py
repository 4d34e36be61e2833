"""One runner for every experiment: modes, stage training with resume, sampling, outputs.

An experiment subclasses :class:`Experiment` and supplies only what is its own (its data, the
models of its stages, how a sampler run goes through them, its evaluators);
:func:`train_and_evaluate` does the rest for all of them:

* ``mode="train"``: validate the config, claim the workdir, train every stage in order, each
  resuming from its newest checkpoint (``checkpoints/<stage>``), logging to ``train_log.jsonl``,
  TensorBoard (``tensorboard/<stage>``) and ``loss_curves.png``.
* ``mode="distill"``: progressive distillation of every stage's trained EMA model,
  ``config.distill.rounds`` rounds from ``config.distill.teacher_steps`` DDIM steps down, each
  round a checkpointed, resumable stage ``<stage>_student_<steps>``.
* ``mode="sample"``: restore every stage's EMA model and run every sampler of
  ``config.sampling.runs`` for every sample group, timed; with distillation rounds also each
  student of ``config.distill.sample_steps`` (``student_<k>``) beside the teacher's own DDIM in
  ``k`` steps (``ddim_<k>``). Write ``samples.h5`` (or ``samples_<group>.h5``).
* ``mode="eval"``: read the samples back and evaluate; write ``metrics.json`` (valid JSON: NaN and
  inf as ``null``, listed with the reason under ``"nonfinite"``) and print the console table.
* ``mode="all"``: train, distill (when the config has rounds), sample and evaluate.

One run per workdir (``<workdir>/.lock``); a refused mode writes nothing to the workdir. Expected
failures are :class:`fpcd.errors.ExpectedError` exceptions; :func:`expected_error_message` gives
their one-line message. In a multi-process job every process runs the same code on the same
host data, feeds only its own rows of each batch, and only process 0 writes files and prints.

Where what lives:

* :mod:`fpcd.runner.experiment`: the contract (:class:`Experiment`, :class:`Stage`,
  :class:`Teacher`, :class:`RunSamples`, :func:`merge_metrics`).
* :mod:`fpcd.runner.workdir`: ``config.json`` and the run's identity (:func:`check_workdir`,
  :func:`check_checkpoints`, :func:`prepare_workdir`, :func:`lock_workdir`, the experiment's
  ``FIELDS_ADDED_LATER``), :func:`checkpoint_dir`.
* :mod:`fpcd.runner.processes`: multi-process helpers (:func:`is_main_process`, :func:`say`,
  :func:`process_rows`, :func:`main_process_first`, :func:`to_host`, :func:`place_rows`).
* :mod:`fpcd.runner.training`: stage training with resume, logs, ``train_info.json``, loss
  curves (:func:`train`, :func:`train_stage`, :func:`make_stage_state`, :func:`restore_models`).
* :mod:`fpcd.runner.distillation`: distillation rounds and students (:func:`distill`,
  :func:`student_stage`, :func:`restore_students`).
* :mod:`fpcd.runner.batching`: any batched function over many items on every device, timed
  (:func:`run_batched`, :func:`batch_rows`), and :class:`BatchSampler` built on it.
* :mod:`fpcd.runner.runs`: the sampler runs and their keys (:func:`run_key`,
  :func:`student_runs`, :func:`run_names`, :func:`generate_all`) and the samples files
  (:func:`write_samples`, :func:`read_samples`).
* :mod:`fpcd.runner.errors`: :func:`expected_error_message`, :func:`explain_nonfinite`.
* :mod:`fpcd.runner.job`: :func:`train_and_evaluate`, the modes.
"""

from fpcd.runner.batching import (Batched, BatchSampler, batch_placement, batch_rows, run_batched,
                                  warmup_options)
from fpcd.runner.distillation import (DISTILL_CURVES_FILE, distill, is_student, require_trained, restore_students,
                                      sampled_students, student_name, student_stage)
from fpcd.runner.errors import NONFINITE_REASON, expected_error_message, explain_nonfinite
from fpcd.runner.experiment import Experiment, RunSamples, Stage, Teacher, merge_metrics
from fpcd.runner.job import METRICS_FILE, MODES, train_and_evaluate
from fpcd.runner.processes import is_main_process, main_process_first, place_rows, process_rows, say, to_host
from fpcd.runner.runs import generate_all, read_samples, run_key, run_names, student_runs, write_samples
from fpcd.runner.training import (LOSS_CURVES_FILE, TRAIN_INFO_FILE, TRAIN_LOG_FILE, TrainLog, check_batch_sizes,
                                  make_stage_state, read_train_log, record_training, restore_models, restore_stage,
                                  train, train_stage, train_step_memory_bytes)
from fpcd.runner.workdir import (CONFIG_FILE, check_checkpoints, check_workdir, checkpoint_dir, compare_run,
                                 config_differences, lock_workdir, prepare_workdir, read_json)

__all__ = [
    # the contract
    "Experiment", "Stage", "Teacher", "RunSamples", "merge_metrics",
    # the job
    "train_and_evaluate", "MODES", "METRICS_FILE",
    # workdir and identity
    "CONFIG_FILE", "check_workdir", "check_checkpoints", "compare_run", "config_differences", "prepare_workdir",
    "lock_workdir", "checkpoint_dir", "read_json",
    # processes
    "is_main_process", "say", "process_rows", "main_process_first", "to_host", "place_rows",
    # training
    "TRAIN_LOG_FILE", "TRAIN_INFO_FILE", "LOSS_CURVES_FILE", "TrainLog", "check_batch_sizes", "make_stage_state",
    "read_train_log", "record_training", "restore_models", "restore_stage", "train", "train_stage",
    "train_step_memory_bytes",
    # distillation
    "DISTILL_CURVES_FILE", "distill", "is_student", "require_trained", "restore_students", "sampled_students",
    "student_name", "student_stage",
    # batched evaluation and sampling
    "Batched", "BatchSampler", "batch_placement", "batch_rows", "run_batched", "warmup_options",
    "run_key", "student_runs", "run_names", "generate_all", "write_samples", "read_samples",
    # errors
    "NONFINITE_REASON", "expected_error_message", "explain_nonfinite",
]
