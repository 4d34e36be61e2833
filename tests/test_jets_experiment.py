"""The jets experiment end to end (tiny preset, 4 forced CPU devices) and its input errors."""

import json
import os
import sys

import h5py
import numpy as np
import pytest

from conftest import run_main
from fpcd.config import ConfigError
from fpcd.data.jetnet import load
from fpcd.pipelines import jets as jets_pipeline
from fpcd.sampling import nfe_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import jetnet as jetnet_config  # noqa: E402  (experiments/jetnet.py)


def _main(workdir, cache, *args, devices=None):
    return run_main("experiments/jetnet.py:tiny", f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *args,
                    devices=devices)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("jets_tiny")
    cache = tmp_path_factory.mktemp("jet_cache")
    proc = _main(workdir, cache, devices=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, cache, proc


def test_tiny_run_on_four_devices_writes_every_output(tiny_run):
    workdir, _, proc = tiny_run
    cfg = jetnet_config.get_config("tiny")
    metrics = json.loads((workdir / "metrics.json").read_text())
    types = cfg.data.jet_types.split(",")
    assert sorted(metrics["types"]) == sorted(types)
    for jet_type in types:
        row = metrics["types"][jet_type]
        for key in ("w1m", "w1p", "w1efp", "fpd", "kpd"):
            assert np.isfinite(row["floor"][key]) and row["floor"][key] >= 0
        assert set(row["runs"]) == set(cfg.sampling.runs)
        for name, r in row["runs"].items():
            run = dict(cfg.sampling.runs[name])
            expected = nfe_of(run.pop("method"), **run)
            assert r["nfe"] == expected if expected is not None else r["nfe"] > 6
            assert r["nfe_jet_stage"] == r["nfe"] if expected is not None else r["nfe_jet_stage"] > 6
            assert r["seconds"] > 0 and r["jets_per_second"] > 0
            for key in ("w1m", "w1m_std", "w1p", "w1efp", "fpd", "kpd"):
                assert key in r
        jets = load(str(workdir / f"samples_{jet_type}.h5"))  # the JetNet layout, first run at top level
        assert jets.jet_type == jet_type and jets.particle_features.shape[1:] == (cfg.data.num_particles, 4)
        assert np.all(jets.particle_features[~jets.mask] == 0.0)
        np.testing.assert_array_equal(jets.mask.sum(1), jets.jet_features[:, 3])
        with h5py.File(workdir / f"samples_{jet_type}.h5") as f:
            assert set(f["runs"]) == set(cfg.sampling.runs)
        assert (workdir / f"jets_{jet_type}.png").stat().st_size > 10_000
    for png in ("nfe_vs_w1m.png", "nfe_vs_w1p.png"):
        assert (workdir / png).stat().st_size > 5_000
    assert "W1M" in proc.stdout


def test_a_workdir_of_a_different_config_is_refused(tiny_run):
    workdir, cache, _ = tiny_run
    before = (workdir / "config.json").read_text()
    proc = _main(workdir, cache, "--config.particle_model.width=32", "--mode=train")
    assert proc.returncode != 0 and "holds a run of a different config" in proc.stderr
    assert (workdir / "config.json").read_text() == before


def test_unreadable_data_file_gives_one_clear_error(tmp_path):
    (tmp_path / "q.hdf5").write_text("not hdf5")
    proc = _main(tmp_path / "work", tmp_path / "cache", f"--config.data.path_pattern={tmp_path}/{{type}}.hdf5")
    assert proc.returncode != 0
    assert "not a readable hdf5 file" in proc.stderr and "q.hdf5" in proc.stderr
    assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("data.jet_types", "q,b", "unknown jet type"),
        ("data.num_particles", 50, "30 or 150"),
        ("particle_model.num_heads", 3, "divisible"),
        ("train_jet.learning_rate", 0.0, "config.train_jet.learning_rate"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    cfg = jetnet_config.get_config("tiny")
    section, name = field.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
        cfg.data.path_pattern = "/data/{type}.hdf5"
    with pytest.raises(ConfigError, match=match):
        jets_pipeline.validate(cfg, num_devices=1)
