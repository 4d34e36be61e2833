"""Run-level faults of ``experiments/main.py`` and the runner: every expected failure ends
in one ``error:`` line and a non-zero exit, one run per workdir, unreadable or foreign checkpoints,
a full disk, and metrics that cannot be computed. Most checks call the library in-process on the
gmm tiny preset (one short training shared by the module); four run ``experiments/main.py``."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import run_main
from fpcd.checkpoint import Checkpointer, UnreadableCheckpointError, ignore_closed_loop_callbacks
from fpcd.config import ConfigError
from fpcd.data.jetnet import JetSet
from fpcd.experiments.calo import CaloExperiment
from fpcd.experiments.eic import EicExperiment
from fpcd.experiments.gmm import GaussianMixtureExperiment
from fpcd.experiments.jetnet import JetData, JetNetExperiment
from fpcd.io import DiskFullError, WorkdirLock, WorkdirLockedError
from fpcd.parallel import data_mesh
from fpcd.runner import RunSamples, expected_error_message, train_and_evaluate, write_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import calo as calo_config  # noqa: E402  (experiments/calo.py)
import eic as eic_config  # noqa: E402
import gmm as gmm_config  # noqa: E402
import jetnet as jetnet_config  # noqa: E402

NUM_STEPS, CHECKPOINT_EVERY = 20, 10


def tiny_config(**train):
    """gmm tiny, 20 training steps checkpointed at 10 and 20, no distillation, one small sampler run."""
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.train.update({"num_steps": NUM_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "warmup_steps": 5,
                          "log_every": 10, **train})
        cfg.distill.rounds = 0
        cfg.sampling.update({"num_samples": 200, "batch_size": 200})
        cfg.sampling.runs = {"em_20": {"method": "em", "steps": 20}}
        cfg.eval.evaluators = ("w1",)
    return cfg


def mesh():
    return data_mesh(jax.devices()[:1])


def run(cfg, workdir, mode, experiment_class=GaussianMixtureExperiment):
    return train_and_evaluate(experiment_class(cfg, progress=False), str(workdir), mode, mesh())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir holding the trained tiny run (checkpoints at steps 10 and 20)."""
    workdir = tmp_path_factory.mktemp("faults") / "trained"
    run(tiny_config(), workdir, "train")
    return workdir


@pytest.fixture
def copy(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def assert_one_error_line(proc, *fragments):
    """The CLI ended in one ``error:`` line on stderr, no traceback, a non-zero exit."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- 1. expected errors: one message, no traceback ---------------------------------------------------


@pytest.mark.parametrize("config,override,section,listed", [
    ("experiments/gmm.py:tiny", "--config.nonexistent=1", "config", "train"),
    ("experiments/calo.py:tiny", "--config.data.nonexistent=1", "config.data", "momentum_range"),
], ids=["top_level", "data_section"])
@pytest.mark.e2e
def test_unknown_override_field_is_named_with_the_fields_of_its_section(tmp_path, config, override, section,
                                                                        listed):
    """Guards against ``AttributeError: "'nonexistent'"`` with a traceback from ml_collections' flag parsing."""
    proc = run_main(config, override, f"--workdir={tmp_path / 'w'}", timeout=120)
    line = assert_one_error_line(proc, f"unknown field 'nonexistent' of {section}", listed)
    assert f"{section} has the fields" in line
    assert not (tmp_path / "w").exists()


@pytest.mark.e2e
def test_config_file_error_is_one_line(tmp_path):
    """Guards against absl's "FATAL Flags parsing error" with the config file's traceback and a usage hint."""
    proc = run_main("experiments/gmm.py:bogus", f"--workdir={tmp_path / 'w'}", timeout=120)
    assert_one_error_line(proc, "unknown variant 'bogus'")


@pytest.mark.parametrize("module,cls,field,value,match", [
    (calo_config, CaloExperiment, "data.momentum_range", (30.0,), r"config.data.momentum_range=\(30.0,\).*pair"),
    (calo_config, CaloExperiment, "data.momentum_range", (30.0, float("nan")), "config.data.momentum_range.*finite"),
    (calo_config, CaloExperiment, "data.momentum_range", (30.0, 2.0), "config.data.momentum_range.*min <= max"),
    (calo_config, CaloExperiment, "data.theta_range", (16.0, 70.0), "config.data.theta_range.*< 60"),
    (calo_config, CaloExperiment, "eval.momentum_bins", (5.0,), "config.eval.momentum_bins"),
    (calo_config, CaloExperiment, "data.buckets", (32.5,), "config.data.buckets"),
    (eic_config, EicExperiment, "data.buckets", ("16",), "config.data.buckets"),
    (jetnet_config, JetNetExperiment, "data.jet_types", ("x",), "config.data.jet_types"),
], ids=["calo_scalar_range", "calo_nan_range", "calo_reversed_range", "calo_theta", "calo_bins", "calo_buckets",
        "eic_buckets", "jet_types"])
def test_tuple_fields_are_validated_naming_the_field(module, cls, field, value, match):
    """Was (momentum_range): ``not enough values to unpack`` from the shower simulation."""
    cfg = module.get_config("tiny")
    section, name = field.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
    with pytest.raises(ConfigError, match=match):
        cls(cfg, progress=False).validate(1)


def _fake_jets(jet_type, n, seed):
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, 30, 4), np.float32)
    counts = rng.integers(5, 30, n)
    for i, m in enumerate(counts):
        particles[i, :m, :2] = rng.normal(0, 0.1, (m, 2))
        particles[i, :m, 2] = rng.dirichlet(np.ones(m))
        particles[i, :m, 3] = 1.0
    jets = np.stack([rng.uniform(500, 1000, n), rng.normal(0, 1, n), rng.uniform(20, 200, n), counts], 1)
    return JetSet(jet_type, particles, jets.astype(np.float32))


class FakeJets(JetNetExperiment):
    """The jets experiment on random jets (no event generator)."""

    def load_jets(self, jet_type):
        return _fake_jets(jet_type, self.cfg.data.num_jets, ord(jet_type))


def test_too_few_training_examples_name_the_batch_size_field(tmp_path):
    """Guards against ``ValueError: batch size 64 exceeds the number of training examples 28`` at the first batch."""
    cfg = jetnet_config.get_config("tiny")
    with cfg.unlocked():
        cfg.data.num_jets = 20
        cfg.sampling.update({"num_samples": 3, "batch_size": 3})
    with pytest.raises(ConfigError, match=r"config.train_global.batch_size=64 exceeds the 28 training examples"):
        run(cfg, tmp_path / "w", "train", FakeJets)
    assert not (tmp_path / "w").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("config_json", [True, False], ids=["config_json", "checkpoints_only"])
def test_a_workdir_of_another_experiment_is_named(copy, config_json):
    """Guards against a list of ``cell_model.*`` differences; now the experiments are named, from config.json or
    (when it was removed) from the config stored with the checkpoints."""
    if not config_json:
        os.remove(copy / "config.json")
    with pytest.raises(ConfigError, match=f"workdir {copy}.* holds a run of experiment 'gmm', not 'calo'"):
        run(calo_config.get_config("tiny"), copy, "train", CaloExperiment)


@pytest.mark.e2e
@pytest.mark.parametrize("mode,holding", [("sample", "config_only"), ("eval", "config_only"),
                                          ("distill", "config_only"), ("sample", "empty")])
def test_a_refused_mode_writes_nothing_to_the_workdir(trained, tmp_path, mode, holding):
    """Guards against ``--mode=sample`` (eval, distill) rewrote config.json (and distill created
    checkpoints/score) before finding that the workdir holds no trained run."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    if holding == "config_only":
        shutil.copy(trained / "config.json", workdir / "config.json")
    before = {p: (workdir / p).read_bytes() for p in os.listdir(workdir)}
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.sampling.num_samples = 100  # a field a new invocation may change: it would be recorded
        if mode == "distill":
            cfg.distill.rounds = 3
    with pytest.raises(ConfigError, match="holds no run|no checkpoint of stage 'score'|has trained 0 of"):
        run(cfg, workdir, mode)
    assert {p: (workdir / p).read_bytes() for p in os.listdir(workdir)} == before


# --- 2. one run per workdir -------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(copy):
    """Guards against two runs on one workdir crashed each other inside orbax."""
    with WorkdirLock(str(copy)):
        with pytest.raises(WorkdirLockedError, match=f"workdir {copy} is in use by another run \\(pid {os.getpid()} "
                                                     "on host"):
            run(tiny_config(), copy, "train")
        proc = run_main("experiments/gmm.py:tiny", f"--workdir={copy}", "--mode=train", timeout=300)
    assert_one_error_line(proc, f"workdir {copy} is in use by another run (pid {os.getpid()} on host")
    assert not (copy / ".lock").exists()  # released


@pytest.mark.e2e
def test_the_lock_of_a_killed_run_does_not_block_the_next(copy):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fpcd.io import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(copy)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} "):
            run(tiny_config(), copy, "train")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (copy / ".lock").exists()  # left behind by the killed run
    run(tiny_config(), copy, "train")  # the finished training is restored, nothing refused
    assert not (copy / ".lock").exists()


# --- 3. checkpoints ---------------------------------------------------------------------------------


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        if os.path.basename(root) == "d":
            for name in files:
                open(os.path.join(root, name), "w").close()


@pytest.mark.e2e
def test_an_unreadable_newest_checkpoint_is_skipped_and_training_resumes_from_the_previous(copy, capsys):
    """Guards against hundreds of lines ending in ``Event loop is closed``."""
    ignore_closed_loop_callbacks()  # as experiments/main.py does: orbax's abandoned reads
    directory = copy / "checkpoints" / "score"
    _truncate_arrays(directory / str(NUM_STEPS))
    run(tiny_config(), copy, "train")
    out, err = capsys.readouterr()
    assert f"skipping step {NUM_STEPS} of {directory}, which cannot be read" in out
    assert f"resuming from checkpoint at step {CHECKPOINT_EVERY}" in out
    assert "Event loop is closed" not in err
    assert (directory / f"{NUM_STEPS}.unreadable").is_dir()  # set aside, not deleted
    cfg = tiny_config()
    experiment = GaussianMixtureExperiment(cfg, progress=False)
    stage = experiment.stages(experiment.load_data())[0]
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        assert checkpointer.all_steps() == [CHECKPOINT_EVERY, NUM_STEPS]
        from fpcd.runner import make_stage_state

        state = checkpointer.restore(make_stage_state(stage, experiment.sde, mesh())[0], step=NUM_STEPS)
    assert int(state.step) == NUM_STEPS  # trained again from step 10


@pytest.mark.e2e
def test_no_readable_checkpoint_is_one_clear_error(copy, capsys):
    ignore_closed_loop_callbacks()  # as experiments/main.py does: orbax's abandoned reads
    for step in (CHECKPOINT_EVERY, NUM_STEPS):
        _truncate_arrays(copy / "checkpoints" / "score" / str(step))
    with pytest.raises(UnreadableCheckpointError, match="no step of .*checkpoints/score can be read") as info:
        run(tiny_config(), copy, "sample")
    message = expected_error_message(info.value)
    assert f"step {NUM_STEPS}: " in message and f"step {CHECKPOINT_EVERY}: " in message
    assert "Event loop is closed" not in capsys.readouterr().err


@pytest.mark.e2e
def test_checkpoints_of_another_model_are_refused_before_restoring(copy):
    """Guards against orbax's shape error (``Requested shape ... is not compatible``) once config.json was removed."""
    os.remove(copy / "config.json")
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.width = 32
    with pytest.raises(ConfigError, match=r"checkpoints/score/20\) holds a run of a different config "
                                          r"\(model.width: 64 -> 32\)"):
        run(cfg, copy, "train")
    assert not (copy / "config.json").exists()


@pytest.mark.parametrize("where", ["save", "background"])
def test_a_full_disk_during_a_checkpoint_save_names_it_and_keeps_the_previous(tmp_path, monkeypatch, where):
    """Guards against hundreds of lines of orbax errors that never said "no space left on device"."""
    directory = tmp_path / "ckpt"
    tree = {"w": np.arange(4.0, dtype=np.float32)}
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        checkpointer.save(1, tree)
        checkpointer.wait()
    if where == "save":
        def fail(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "2"))
        monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    else:  # how orbax reports it: tensorstore's error, raised when the background write is awaited
        def fail(self):
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "0/0" in OCDBT database at local file '
                             f'"{directory}/2.orbax-checkpoint-tmp/state/": No space left on device '
                             "[os_error_code='28']")
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fail)
    with pytest.raises(DiskFullError) as info:
        with Checkpointer(str(directory), save_every=1) as checkpointer:
            checkpointer.save(2, {"w": tree["w"] * 2})
            checkpointer.wait()
    monkeypatch.undo()
    message = expected_error_message(info.value)
    assert message.startswith(f"no space left on device writing {directory}/2") and "(step 1) is intact" in message
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        np.testing.assert_array_equal(checkpointer.restore(tree)["w"], tree["w"])


# --- 4. metrics that cannot be computed -------------------------------------------------------------


class CheapEvaluation(GaussianMixtureExperiment):
    """The gmm experiment with one quick evaluator: the mean of each run's samples (NaN for NaN
    samples); it explains run ``em_20``'s NaN itself and leaves ``ddim_10``'s to the runner."""

    def evaluators(self):
        return {"w1": self.sample_mean}

    def sample_mean(self, data, samples, models, *, figures_dir):
        runs = {name: {"nfe": r.info["nfe"], "mean": float(np.mean(r.arrays["samples"]))}
                for name, r in samples[""].items()}
        return {"runs": runs, "nonfinite": {"runs.em_20": "every em_20 sample is NaN"}}

    def format_results(self, metrics):
        return ""


def _write_nonfinite_samples(workdir):
    nan = np.full((200, 2), np.nan, np.float32)
    write_samples(str(workdir / "samples.h5"), {
        "em_20": RunSamples({"samples": nan}, {"nfe": 20, "seconds": 1.0}, {"method": "em", "steps": 20}),
        "ddim_10": RunSamples({"samples": np.full((200, 2), np.inf, np.float32)}, {"nfe": 10, "seconds": 1.0},
                              {"method": "ddim", "steps": 10})})


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not valid JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.e2e
def test_nonfinite_metrics_are_written_as_null_with_a_reason(copy):
    """Guards against ``NaN`` / ``Infinity`` in metrics.json (invalid JSON) without a word of why."""
    _write_nonfinite_samples(copy)
    metrics = run(tiny_config(), copy, "eval", CheapEvaluation)
    written = _strict_json(copy / "metrics.json")
    assert written["runs"]["em_20"]["mean"] is None and written["runs"]["ddim_10"]["mean"] is None
    reasons = written["nonfinite"]
    assert set(reasons) == {"runs.em_20.mean", "runs.ddim_10.mean"} and metrics["nonfinite"] == reasons
    assert reasons["runs.em_20.mean"] == "nan, written as null: every em_20 sample is NaN"
    assert reasons["runs.ddim_10.mean"].startswith("inf, written as null: it could not be computed from the samples")


@pytest.mark.e2e
def test_a_full_disk_writing_metrics_names_the_file_and_keeps_the_old_one(copy, monkeypatch):
    _write_nonfinite_samples(copy)
    (copy / "metrics.json").write_text('{"old": 1}\n')

    dump = json.dump

    def full(data, f, **kwargs):  # the disk fills up at metrics.json (config.json is rewritten first)
        if os.path.basename(f.name).startswith(".metrics.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return dump(data, f, **kwargs)

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(DiskFullError) as info:
        run(tiny_config(), copy, "eval", CheapEvaluation)
    assert expected_error_message(info.value).startswith(f"no space left on device writing {copy}/metrics.json")
    assert (copy / "metrics.json").read_text() == '{"old": 1}\n'
    assert not [p for p in os.listdir(copy) if p.endswith(".tmp")]


def test_jet_metrics_and_figures_survive_runs_without_finite_jets(tmp_path):
    """Guards against ``ValueError: Data cannot be log-scaled`` drawing nfe_vs_w1m.png when no run had a finite
    W1M, and a crash in the metrics for a run whose jets were all dropped as non-finite."""
    cfg = jetnet_config.get_config("tiny")
    with cfg.unlocked():
        cfg.data.jet_types = ("q",)
        cfg.sampling.num_samples = 40
    experiment = JetNetExperiment(cfg, progress=False)
    data = JetData(("q",), {"q": _fake_jets("q", 200, 0)}, 0.5)
    nan = _fake_jets("q", 40, 1)
    nan.particle_features[..., :3] = np.nan
    samples = {"q": {
        "em_20": RunSamples({"particle_features": nan.particle_features, "jet_features": nan.jet_features},
                            {"nfe": 20, "seconds": 1.0, "jets_per_second": 40.0}, {"method": "em", "steps": 20}),
        "ddim_10": RunSamples({"particle_features": nan.particle_features[:0], "jet_features": nan.jet_features[:0]},
                              {"nfe": 10, "seconds": 1.0, "jets_per_second": 40.0, "num_nonfinite_dropped": 40},
                              {"method": "ddim", "steps": 10})}}
    metrics = experiment.evaluate_jet_metrics(data, samples, {}, figures_dir=str(tmp_path))
    assert (tmp_path / "jets_q.png").stat().st_size > 1000
    assert np.isnan(metrics["types"]["q"]["runs"]["em_20"]["w1m"])
    assert metrics["nonfinite"] == {
        "types.q.runs.em_20": "0 of the 40 generated q jets are finite; the jet metrics need at least 2",
        "types.q.runs.ddim_10": "0 of the 40 generated q jets are finite; the jet metrics need at least 2"}
    assert "nan" in experiment.format_results(metrics)
