"""The toy experiment end to end through ``experiments/main.py`` and ``launch.sh``: the shared runner's
modes, resume, training log, the multi-process path, and config errors."""

import json
import os
import shutil
import sys

import equinox as eqx
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import expected_log_steps, run_launch, run_main, tensorboard_scalars
from fpcd.checkpoint import Checkpointer
from fpcd.config import ConfigError
from fpcd.experiments.gmm import GaussianMixtureExperiment
from fpcd.metrics import w1_per_dimension
from fpcd.parallel import data_mesh
from fpcd.runner import checkpoint_dir, make_stage_state, student_stage, train_and_evaluate
from fpcd.sampling import nfe_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import gmm as gmm_config  # noqa: E402  (experiments/gmm.py)

TINY = "experiments/gmm.py:tiny"


def _main(*args, devices=None):
    return run_main(TINY, *args, devices=devices, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset as one process with two CPU devices."""
    workdir = tmp_path_factory.mktemp("gmm_tiny")
    proc = _main(f"--workdir={workdir}", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The tiny preset as two processes of one CPU device each (``launch.sh --local --processes 2``);
    without distillation, which the calo tiny run covers as two processes."""
    workdir = tmp_path_factory.mktemp("gmm_tiny_2proc")
    proc = run_launch(TINY, f"--workdir={workdir}", "--config.eval.evaluators=('w1',)", "--config.distill.rounds=0",
                      processes=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def _log_rows(workdir):
    return [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]


def _final_parameters(workdir, student_steps=None):
    """The teacher's (or the ``student_steps``-step student's) final model and EMA parameters."""
    cfg = gmm_config.get_config("tiny")
    experiment = GaussianMixtureExperiment(cfg, progress=False)
    stage = experiment.stages(experiment.load_data())[0]
    num_steps = cfg.train.num_steps
    if student_steps is not None:
        stage, num_steps = student_stage(experiment, stage, student_steps, stage.model), cfg.distill.num_steps
    template, _ = make_stage_state(stage, experiment.sde, data_mesh(jax.devices()[:1]))
    with Checkpointer(checkpoint_dir(str(workdir), stage.name), save_every=1) as checkpointer:
        state = checkpointer.restore(template, step=num_steps)
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(eqx.filter((state.model, state.ema_model),
                                                                                eqx.is_array))]


@pytest.mark.e2e
def test_tiny_run_writes_metrics_samples_plots_and_training_log(tiny_run):
    workdir, proc = tiny_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    cfg = gmm_config.get_config("tiny")
    students = [f"{who}_{k}" for k in cfg.distill.sample_steps for who in ("ddim", "student")]
    assert list(metrics["runs"]) == list(cfg.sampling.runs) + students
    for name, row in metrics["runs"].items():
        run = dict(cfg.sampling.runs[name]) if name in cfg.sampling.runs else {"method": "ddim", **row["options"]}
        method = run.pop("method")
        expected = nfe_of(method, **run)
        assert row["nfe"] == expected if expected is not None else row["nfe"] > 6
        assert row["seconds"] > 0 and len(row["w1"]) == 2
    for k in cfg.distill.sample_steps:
        student = metrics["runs"][f"student_{k}"]
        assert student["nfe"] == k and student["student"] and student["teacher_steps"] == 2 * k
        assert "student" not in metrics["runs"][f"ddim_{k}"]
    assert metrics["train"]["score"]["steps"] == cfg.train.num_steps
    for k in (4, 2, 1):  # three rounds from 8 steps
        assert metrics["train"][f"score_student_{k}"]["steps"] == cfg.distill.num_steps
    with h5py.File(workdir / "samples.h5") as f:
        for name in list(cfg.sampling.runs) + students:
            assert f[f"runs/{name}/samples"].shape == (cfg.sampling.num_samples, 2)
    for png in ("samples.png", "marginals.png", "nfe_vs_w1.png", "loss_curves.png", "distill_loss_curves.png"):
        assert (workdir / png).stat().st_size > 1000
    assert "NFE" in proc.stdout and "log-likelihood" in proc.stdout and "student_1" in proc.stdout
    all_rows = _log_rows(workdir)
    rows = [r for r in all_rows if r["stage"] == "score"]
    for k in (4, 2, 1):
        assert [r["step"] for r in all_rows if r["stage"] == f"score_student_{k}"] == expected_log_steps(cfg.distill)
    assert [r["step"] for r in rows] == expected_log_steps(cfg.train)
    for r in rows:
        assert r["stage"] == "score" and np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["steps_per_second"] > 0
        assert 0 < r["learning_rate"] <= cfg.train.learning_rate
    assert rows[-1]["learning_rate"] < 0.05 * cfg.train.learning_rate  # the cosine schedule has decayed
    scalars = tensorboard_scalars(workdir / "tensorboard" / "score")
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)


@pytest.mark.e2e
def test_trained_model_beats_the_prior_and_its_likelihood_is_close_to_the_exact_one(tiny_run, mixture):
    """A broken or untrained model fails these: its samples are no closer to the mixture than the
    N(0, I) prior is (measured W1 0.10-0.14 for the trained tiny model against 0.31 for the prior),
    and its log-likelihood is no better than the prior's (measured: model -1.73, exact -1.34,
    prior -2.99 nats)."""
    workdir, _ = tiny_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    cfg = gmm_config.get_config("tiny")
    n = cfg.sampling.num_samples
    truth = np.asarray(mixture.sample(jax.random.key(123), n))
    prior = np.asarray(jax.random.normal(jax.random.key(124), (n, 2)))
    prior_w1 = float(w1_per_dimension(prior, truth).mean())
    for name, row in metrics["runs"].items():  # students: test_students_beat_the_teachers_own_ddim...
        if name in cfg.sampling.runs:
            assert row["w1_mean"] < 0.6 * prior_w1, (name, row["w1_mean"], prior_w1)
    ll = metrics["log_likelihood"]
    assert abs(ll["model_mean_nats"] - ll["exact_mean_nats"]) < 0.6, ll
    assert ll["nfe"] > 6


@pytest.mark.e2e
def test_two_processes_train_and_sample_like_one_process_with_two_devices(tiny_run, two_process_run):
    """Both run the same sharded programs over two devices; measured bit-identical (losses, gradient
    norms, parameters, sample W1), so rtol 1e-4 leaves room only for a different XLA build."""
    one_workdir, _ = tiny_run
    two_workdir, proc = two_process_run
    one, two = ([r for r in _log_rows(w) if r["stage"] == "score"] for w in (one_workdir, two_workdir))
    assert [r["step"] for r in two] == [r["step"] for r in one]  # process 0 alone logs: no duplicates
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4)
    for a, b in zip(_final_parameters(two_workdir), _final_parameters(one_workdir)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    metrics_one = json.loads((one_workdir / "metrics.json").read_text())
    metrics_two = json.loads((two_workdir / "metrics.json").read_text())
    assert metrics_two["num_samples"] == metrics_one["num_samples"]
    with h5py.File(one_workdir / "samples.h5") as f1, h5py.File(two_workdir / "samples.h5") as f2:
        for name in f2["runs"]:
            assert f2[f"runs/{name}/samples"].shape == f1[f"runs/{name}/samples"].shape
    for name, row in metrics_two["runs"].items():  # the same trained model, sampled the same way
        assert row["nfe"] == metrics_one["runs"][name]["nfe"]
        np.testing.assert_allclose(row["w1_mean"], metrics_one["runs"][name]["w1_mean"], rtol=1e-6)
    # One set of outputs, written and printed once.
    assert proc.stdout.count("results in") == 1
    assert len(list((two_workdir / "tensorboard" / "score").iterdir())) == 1
    assert not [p for p in os.listdir(two_workdir) if p.startswith(".") and p.endswith(".tmp")]


@pytest.mark.e2e
def test_students_beat_the_teachers_own_ddim_at_the_same_steps(tiny_run):
    """What proves distillation does something: with the same prior noise, a 4-step and a 1-step
    student land far closer to the mixture than the teacher's DDIM in as many steps (measured on
    the tiny run: W1 0.151 vs 0.319 at 4 steps, 0.251 vs 0.917 at 1 step; an untrained student is
    the teacher, ratio 1), and the 4-step student stays near the teacher's own many-step samplers
    (em_20: 0.121, ratio 1.25)."""
    workdir, _ = tiny_run
    runs = json.loads((workdir / "metrics.json").read_text())["runs"]
    for k in (4, 1):
        assert runs[f"student_{k}"]["w1_mean"] < 0.6 * runs[f"ddim_{k}"]["w1_mean"], (k, runs)
    assert runs["student_4"]["w1_mean"] < 1.6 * runs["em_20"]["w1_mean"], runs


@pytest.mark.e2e
def test_killed_distillation_resumes_mid_round_bit_identically(tiny_run, tmp_path):
    """Dropping the last round's final checkpoint (a run killed between its two checkpoints) and
    rerunning ``--mode=distill`` redoes that round from its middle checkpoint and ends with the
    same student as the uninterrupted run."""
    workdir, _ = tiny_run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    cfg = gmm_config.get_config("tiny")
    shutil.rmtree(copy / "checkpoints" / "score_student_1" / str(cfg.distill.num_steps))
    proc = _main(f"--workdir={copy}", "--mode=distill", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[score_student_1] resuming from checkpoint at step {cfg.distill.checkpoint_every}" in proc.stdout
    for a, b in zip(_final_parameters(copy, 1), _final_parameters(workdir, 1)):
        np.testing.assert_array_equal(a, b)
    rows = [r["step"] for r in _log_rows(copy) if r["stage"] == "score_student_1"]
    assert rows == expected_log_steps(cfg.distill)  # the redone steps' rows replaced, not duplicated


@pytest.mark.e2e
def test_train_mode_only_trains_and_later_modes_name_what_is_missing(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--mode=train", "--config.train.num_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "score" / "20").is_dir()
    assert not (tmp_path / "samples.h5").exists() and not (tmp_path / "metrics.json").exists()
    proc = _main(f"--workdir={tmp_path}", "--mode=sample", "--config.train.num_steps=20")
    assert proc.returncode == 1 and "no checkpoint of stage 'score_student_4'" in proc.stderr
    assert "--mode=distill" in proc.stderr and "Traceback" not in proc.stderr
    mesh = data_mesh(jax.devices()[:1])
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.distill.rounds = 0
    with pytest.raises(ConfigError, match="config.distill.rounds is 0"):
        train_and_evaluate(GaussianMixtureExperiment(cfg, progress=False), str(tmp_path), "distill", mesh)
    cfg = gmm_config.get_config("tiny")  # the teacher stopped at 20 of 500 steps
    with pytest.raises(ConfigError, match="stage 'score' has trained 20 of its 500 steps"):
        train_and_evaluate(GaussianMixtureExperiment(cfg, progress=False), str(tmp_path), "distill", mesh)
    assert not (tmp_path / "samples.h5").exists() and not (tmp_path / "checkpoints" / "score_student_4").exists()


@pytest.mark.e2e
def test_students_of_another_teacher_are_refused(tiny_run, tmp_path):
    """A student checkpoint distilled with other settings (or from a teacher trained otherwise) is
    not silently resumed and handed on as the next round's teacher."""
    copy = tmp_path / "other"
    shutil.copytree(tiny_run[0], copy)
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.distill.learning_rate = 0.001
    with pytest.raises(ConfigError, match="holds a student distilled from another teacher.*"
                                          "distill.learning_rate: 0.002 -> 0.001"):
        train_and_evaluate(GaussianMixtureExperiment(cfg, progress=False), str(copy), "distill",
                           data_mesh(jax.devices()[:1]))


@pytest.mark.e2e
def test_sample_mode_on_an_empty_workdir_fails_and_leaves_nothing(tmp_path):
    workdir = tmp_path / "fresh"
    proc = _main(f"--workdir={workdir}", "--mode=sample")
    assert proc.returncode != 0 and "holds no run" in proc.stderr
    assert not workdir.exists()


@pytest.mark.e2e
def test_longer_run_resumes_from_the_checkpoint_and_appends_to_the_log(tiny_run):
    workdir, _ = tiny_run
    before = _log_rows(workdir)
    proc = _main(f"--workdir={workdir}", "--mode=train", "--config.train.num_steps=600", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint at step 500" in proc.stdout
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints" / "score") if d.isdigit())
    assert steps[-1] == 600
    after = _log_rows(workdir)
    assert after[:len(before)] == before and [r["step"] for r in after[len(before):]] == [550, 600]


@pytest.mark.e2e
def test_eval_mode_reuses_saved_samples_and_runs_the_named_evaluators(tiny_run):
    workdir, _ = tiny_run
    before = (workdir / "samples.h5").stat().st_mtime_ns
    w1_before = json.loads((workdir / "metrics.json").read_text())["runs"]
    proc = _main(f"--workdir={workdir}", "--mode=eval", "--config.train.num_steps=600",
                 "--config.eval.evaluators=('w1',)", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "samples.h5").stat().st_mtime_ns == before
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["evaluators"] == ["w1"] and "log_likelihood" not in metrics
    assert "log-likelihood" not in proc.stdout and "W1 mean" in proc.stdout
    assert {name: r["w1"] for name, r in metrics["runs"].items()} == {name: r["w1"] for name, r in w1_before.items()}


@pytest.mark.e2e
def test_workdir_of_a_different_config_is_refused(tiny_run):
    workdir, _ = tiny_run
    config_before = (workdir / "config.json").read_text()
    proc = _main(f"--workdir={workdir}", "--config.model.width=16")
    assert proc.returncode != 0
    assert "holds a run of a different config" in proc.stderr and "model.width" in proc.stderr
    assert (workdir / "config.json").read_text() == config_before


@pytest.mark.e2e
def test_bad_config_value_fails_at_start_naming_the_field(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--config.train.batch_size=0")
    assert proc.returncode != 0
    assert "config.train.batch_size" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def _validate(cfg, num_devices=1):
    GaussianMixtureExperiment(cfg, progress=False).validate(num_devices)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("sde.schedule", "quadratic", "config.sde.schedule"),
        ("sde.beta_max", 0.05, "config.sde.beta_max"),
        ("train.learning_rate", -1.0, "config.train.learning_rate"),
        ("train.prediction", "x0", "config.train.prediction"),
        ("train.batch_size", 100_000, "config.train.batch_size"),
        ("model.width", 0, "config.model.width"),
        ("data.dim", 0, "config.data.dim"),
        ("distill.teacher_steps", 12, "config.distill.teacher_steps.*divisible by 2\\*\\*rounds"),
        ("distill.sample_steps", (3,), "config.distill.sample_steps.*take \\(4, 2, 1\\) steps"),
        ("distill.rounds", -1, "config.distill.rounds"),
        ("distill.learning_rate", 0.0, "config.distill.learning_rate"),
        ("train.prediction", "eps", "config.train.prediction='eps'.*v-prediction teacher"),
        ("train.time_sampling", "logit", "config.train.time_sampling"),
        ("train.noise_std", 0.0, "config.train.noise_std"),
        ("train.noise_mean", float("nan"), "config.train.noise_mean must be a number, got nan"),
        ("train.loss_weighting", "snr", "config.train.loss_weighting"),
        ("train.min_snr_gamma", -5.0, "config.train.min_snr_gamma"),
        ("train.ema_warmup", None, "config.train.ema_warmup must be True or False"),
    ],
)
def test_validation_names_the_field(field, value, match):
    cfg = gmm_config.get_config("tiny")
    section, name = field.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
    with pytest.raises(ConfigError, match=match):
        _validate(cfg)


def test_unknown_sampler_in_config_is_rejected():
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.sampling.runs.em_20.method = "rk4"
    with pytest.raises(ConfigError, match="config.sampling.runs.em_20.method"):
        _validate(cfg)
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.sampling.runs.em_20.steps = -3
    with pytest.raises(ConfigError, match="config.sampling.runs.em_20"):
        _validate(cfg)


def test_a_run_name_states_its_nfe():
    """``pc_20`` is 20 score evaluations (10 steps with one corrector move each) in every config."""
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.sampling.runs.pc_20.steps = 20
    with pytest.raises(ConfigError, match="pc_20.*must take 20 score evaluations.*takes 40"):
        _validate(cfg)


def test_unknown_evaluator_is_rejected():
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.eval.evaluators = ("w1", "fid")
    with pytest.raises(ConfigError, match="config.eval.evaluators.*fid"):
        _validate(cfg)


def test_batch_must_divide_across_devices():
    cfg = gmm_config.get_config("tiny")
    with pytest.raises(ConfigError, match="multiple of the number of devices"):
        _validate(cfg, num_devices=3)


def test_the_train_step_uses_the_configured_noise_levels_and_weighting():
    """The runner hands a training section's levers to the step: its first loss is the DSM loss of
    the initial model with those options on the step's key, and differs from the plain loss."""
    from fpcd.train import dsm_loss

    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.train.update({"loss_weighting": "min_snr", "min_snr_gamma": 2.0, "time_sampling": "lognormal",
                          "noise_mean": -0.5, "noise_std": 0.7})
    experiment = GaussianMixtureExperiment(cfg, progress=False)
    experiment.validate(1)
    stage = experiment.stages(experiment.load_data())[0]
    state, step_fn = make_stage_state(stage, experiment.sde, data_mesh(jax.devices()[:1]))
    batch = jax.tree_util.tree_map(jnp.asarray, stage.batch(0, slice(None)))
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key_data), 0)
    options = {"weighting": "min_snr", "min_snr_gamma": 2.0, "time_sampling": "lognormal", "noise_mean": -0.5,
               "noise_std": 0.7}
    expected = dsm_loss(stage.model, experiment.sde, batch["x"], key, prediction=cfg.train.prediction,
                        t_min=cfg.train.t_min, **options)
    plain = dsm_loss(stage.model, experiment.sde, batch["x"], key, prediction=cfg.train.prediction,
                     t_min=cfg.train.t_min)
    _, metrics = step_fn(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["loss"]) != pytest.approx(float(plain), rel=1e-2)
