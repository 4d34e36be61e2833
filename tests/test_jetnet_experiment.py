"""The jets experiment end to end (tiny preset as two processes joined by jax.distributed) and its
input errors."""

import json
import os
import sys

import h5py
import numpy as np
import pytest

import jax

from conftest import expected_log_steps, run_launch, run_main
from fpcd.config import ConfigError
from fpcd.data.jetnet import load
from fpcd.experiments.jetnet import JetNetExperiment
from fpcd.metrics import jets as jet_metrics
from fpcd.parallel import data_mesh
from fpcd.runner import BatchSampler, run_key
from fpcd.sampling import nfe_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import jetnet as jetnet_config  # noqa: E402  (experiments/jetnet.py)


TINY = "experiments/jetnet.py:tiny"


def _main(workdir, cache, *args, devices=None):
    return run_main(TINY, f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *args, devices=devices)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_jet_cache):
    """The tiny preset as two processes of one CPU device each (``launch.sh --local --processes 2``)."""
    workdir = tmp_path_factory.mktemp("jets_tiny")
    cache = tiny_jet_cache
    proc = run_launch(TINY, f"--workdir={workdir}", f"--config.data.cache_dir={cache}", processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, cache, proc


@pytest.mark.e2e
def test_tiny_run_as_two_processes_writes_every_output_once(tiny_run):
    workdir, _, proc = tiny_run
    cfg = jetnet_config.get_config("tiny")
    metrics = json.loads((workdir / "metrics.json").read_text())
    types = list(cfg.data.jet_types)
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
    for png in ("nfe_vs_w1m.png", "nfe_vs_w1p.png", "loss_curves.png"):
        assert (workdir / png).stat().st_size > 5_000
    assert proc.stdout.count("W1M") == 1 and proc.stdout.count("results in") == 1  # process 0 alone prints
    rows = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    for stage, section in (("jet", cfg.train_global), ("particle", cfg.train_set)):
        steps = [r["step"] for r in rows if r["stage"] == stage]
        assert steps == expected_log_steps(section)
        assert len(list((workdir / "tensorboard" / stage).iterdir())) == 1
    assert metrics["train"]["particle"]["steps"] == cfg.train_set.num_steps
    assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]


@pytest.mark.e2e
def test_trained_model_beats_the_untrained_one(tiny_run):
    """Jets of the trained model are closer to the truth (W1M, W1P) than those the untrained networks
    make from the same noise (same keys, same conditioning): measured for the tiny preset, W1M
    0.023-0.071 trained vs 0.028-0.076 untrained and W1P lower by 8-13 %, for every type and
    sampler. The comparison is deterministic."""
    workdir, cache, _ = tiny_run
    cfg = jetnet_config.get_config("tiny")
    with cfg.unlocked():
        cfg.data.cache_dir = str(cache)
    experiment = JetNetExperiment(cfg, progress=False)
    data = experiment.load_data()
    untrained = {stage.name: stage.model for stage in experiment.stages(data)}
    sampler = BatchSampler(experiment.sde, data_mesh(jax.devices()[:1]), progress=False)
    metrics = json.loads((workdir / "metrics.json").read_text())
    names = list(cfg.sampling.runs)
    name = "em_20"
    n = cfg.sampling.num_samples
    for g_index, jet_type in enumerate(data.types):
        key = run_key(experiment.key("sampling"), data.types, g_index, names.index(name))
        arrays, _ = experiment.generate(data, untrained, jet_type, dict(cfg.sampling.runs[name]), key, sampler)
        truth = data.test[jet_type].take(slice(0, n)).particle_features
        kw = {"num_eval_samples": n, "num_batches": cfg.eval.num_batches, "seed": cfg.eval.seed}
        w1m = jet_metrics.w1m(truth, arrays["particle_features"], **kw)[0]
        w1p = float(np.mean(jet_metrics.w1p(truth, arrays["particle_features"], **kw)[0]))
        trained = metrics["types"][jet_type]["runs"][name]
        assert trained["w1m"] < w1m and trained["w1p"] < 0.97 * w1p, (jet_type, trained, w1m, w1p)


@pytest.mark.e2e
def test_ablation_rows_pick_each_types_best_sampler(tiny_run):
    """benchmarks/ablation.py on the tiny run: per type the run with the smallest largest W1 ratio."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import ablation

    workdir, *_ = tiny_run
    metrics = json.loads((workdir / "metrics.json").read_text())["types"]
    rows = ablation.jets_rows("tiny", str(workdir))
    assert [r["type"] for r in rows] == list(metrics)
    for row in rows:
        block = metrics[row["type"]]
        worst = {k: max(v[m] / block["floor"][m] for m in ("w1m", "w1p", "w1efp")) for k, v in block["runs"].items()}
        assert set(worst) == {"em_20", "ddim_10"}  # the tiny preset's runs, no students
        assert row["best"] == min(worst, key=worst.get)
        assert row["w1m_over_floor"] == block["runs"][row["best"]]["w1m"] / block["floor"]["w1m"]
        assert row["fpd"] == block["runs"][row["best"]]["fpd"]


@pytest.mark.e2e
def test_a_workdir_of_a_different_config_is_refused(tiny_run):
    workdir, cache, _ = tiny_run
    before = (workdir / "config.json").read_text()
    proc = _main(workdir, cache, "--config.particle_model.width=32", "--mode=train")
    assert proc.returncode != 0 and "holds a run of a different config" in proc.stderr
    assert (workdir / "config.json").read_text() == before


@pytest.mark.e2e
def test_unreadable_data_file_gives_one_clear_error(tmp_path):
    (tmp_path / "q.hdf5").write_text("not hdf5")
    proc = _main(tmp_path / "work", tmp_path / "cache", f"--config.data.path_pattern={tmp_path}/{{type}}.hdf5")
    assert proc.returncode != 0
    assert "not a readable hdf5 file" in proc.stderr and "q.hdf5" in proc.stderr
    assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("data.jet_types", ("q", "b"), "unknown or repeated jet type"),
        ("data.num_particles", 50, "30 or 150"),
        ("particle_model.num_heads", 3, "divisible"),
        ("train_global.learning_rate", 0.0, "config.train_global.learning_rate"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    cfg = jetnet_config.get_config("tiny")
    section, name = field.split(".")
    with cfg.unlocked():
        cfg[section][name] = value
        cfg.data.path_pattern = "/data/{type}.hdf5"
    with pytest.raises(ConfigError, match=match):
        JetNetExperiment(cfg, progress=False).validate(1)


@pytest.mark.e2e
def test_generate_writes_jets_of_the_asked_types_in_the_jetnet_layout(tiny_run, tmp_path, monkeypatch):
    from fpcd.experiments import jetnet as jetnet_experiment
    from fpcd.runner import train_and_evaluate

    workdir, cache, _ = tiny_run
    cfg = jetnet_config.get_config("tiny")
    jet_type = cfg.data.jet_types[-1]
    cfg.generate.update(num_events=30, chunk_size=16, jet_types=(jet_type,), output=str(tmp_path / "gen.h5"))
    cfg.data.cache_dir = str(cache)

    def no_training_jets(*args, **kwargs):
        raise AssertionError("generate read or generated training jets")

    monkeypatch.setattr(jetnet_experiment, "cached_generate", no_training_jets)
    train_and_evaluate(JetNetExperiment(cfg, progress=False), str(workdir), "generate", data_mesh(jax.devices()[:1]))
    jets = load(str(tmp_path / "gen.h5"), jet_type=jet_type, num_particles=cfg.data.num_particles)
    assert jets.particle_features.shape == (30, cfg.data.num_particles, 4) and jets.jet_features.shape == (30, 4)
    with h5py.File(tmp_path / "gen.h5", "r") as f:
        assert set(f["jet_type"][()]) == {list(cfg.data.jet_types).index(jet_type)}
    cfg.generate.jet_types = ("x",)
    with pytest.raises(ConfigError, match=r"config.generate.jet_types=\('x',\): unknown or repeated type\(s\)"):
        train_and_evaluate(JetNetExperiment(cfg, progress=False), str(workdir), "generate", data_mesh())
