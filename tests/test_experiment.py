"""The toy experiment end to end through ``experiments/main.py``, and config errors."""

import json
import os
import sys

import h5py
import pytest

from conftest import run_main
from fpcd.config import ConfigError
from fpcd.pipelines import gmm
from fpcd.sampling import nfe_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import gmm as gmm_config  # noqa: E402  (experiments/gmm.py)


def _main(*args):
    return run_main("experiments/gmm.py:tiny", *args, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gmm_tiny")
    proc = _main(f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_tiny_run_writes_metrics_samples_and_plots(tiny_run):
    workdir, proc = tiny_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    cfg = gmm_config.get_config("tiny")
    assert set(metrics["runs"]) == set(cfg.sampling.runs)
    for name, row in metrics["runs"].items():
        run = dict(cfg.sampling.runs[name])
        method = run.pop("method")
        expected = nfe_of(method, **run)
        assert row["nfe"] == expected if expected is not None else row["nfe"] > 6
        assert row["seconds"] > 0 and len(row["w1"]) == 2
        assert all(v >= 0 for v in row["w1"])
    assert 0 < metrics["floor"]["w1_mean"] < 0.2
    assert metrics["train"]["steps"] == cfg.train.num_steps
    with h5py.File(workdir / "samples.h5") as f:
        for name in cfg.sampling.runs:
            assert f[f"samples/{name}"].shape == (cfg.sampling.num_samples, 2)
    for png in ("samples.png", "marginals.png", "nfe_vs_w1.png"):
        assert (workdir / png).stat().st_size > 1000
    assert "NFE" in proc.stdout


def test_longer_run_resumes_from_the_checkpoint(tiny_run):
    workdir, _ = tiny_run
    proc = _main(f"--workdir={workdir}", "--mode=train", "--config.train.num_steps=300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint at step 200" in proc.stdout
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints" / "score") if d.isdigit())
    assert steps[-1] == 300


def test_eval_mode_reuses_saved_samples(tiny_run):
    workdir, _ = tiny_run
    before = (workdir / "samples.h5").stat().st_mtime_ns
    proc = _main(f"--workdir={workdir}", "--mode=eval", "--config.train.num_steps=300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "samples.h5").stat().st_mtime_ns == before


def test_workdir_of_a_different_config_is_refused(tiny_run):
    workdir, _ = tiny_run
    config_before = (workdir / "config.json").read_text()
    proc = _main(f"--workdir={workdir}", "--config.model.width=16")
    assert proc.returncode != 0
    assert "holds a run of a different config" in proc.stderr and "model.width" in proc.stderr
    assert (workdir / "config.json").read_text() == config_before


def test_bad_config_value_fails_at_start_naming_the_field(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--config.train.batch_size=0")
    assert proc.returncode != 0
    assert "config.train.batch_size" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


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
    ],
)
def test_validation_names_the_field(field, value, match):
    cfg = gmm_config.get_config("tiny")
    section, name = field.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
    with pytest.raises(ConfigError, match=match):
        gmm.validate(cfg, num_devices=1)


def test_unknown_sampler_in_config_is_rejected():
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.sampling.runs.em_20.method = "heun"
    with pytest.raises(ConfigError, match="config.sampling.runs.em_20.method"):
        gmm.validate(cfg, num_devices=1)
    cfg = gmm_config.get_config("tiny")
    with cfg.unlocked():
        cfg.sampling.runs.em_20.steps = -3
    with pytest.raises(ConfigError, match="config.sampling.runs.em_20"):
        gmm.validate(cfg, num_devices=1)


def test_batch_must_divide_across_devices():
    cfg = gmm_config.get_config("tiny")
    with pytest.raises(ConfigError, match="multiple of the number of devices"):
        gmm.validate(cfg, num_devices=3)
