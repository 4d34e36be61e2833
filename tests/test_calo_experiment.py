"""The calorimeter experiment end to end (tiny presets: the point cloud as two processes joined by
jax.distributed, then the image model with the comparison table), its pre/post-processing and its
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
from fpcd.data import calo
from fpcd.data import calo_transforms as transforms
from fpcd.experiments.calo import CaloExperiment, w1_block
from fpcd.metrics import calo as calo_metrics
from fpcd.parallel import data_mesh
from fpcd.runner import BatchSampler, run_key, run_names
from fpcd.sampling import nfe_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import calo as calo_config  # noqa: E402  (experiments/calo.py)


def _main(workdir, variant, *args, devices=None):
    return run_main(f"experiments/calo.py:{variant}", f"--workdir={workdir}", *args, devices=devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("calo")
    cloud, image = root / "cloud", root / "image"
    proc = run_launch("experiments/calo.py:tiny", f"--workdir={cloud}", processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc_image = _main(image, "tiny,image", f"--config.eval.compare_with={cloud}")
    assert proc_image.returncode == 0, proc_image.stderr[-4000:]
    return cloud, image, proc, proc_image


@pytest.mark.e2e
@pytest.mark.parametrize("which", ["cloud", "image"])
def test_tiny_runs_write_every_output(runs, which):
    cloud, image, *_ = runs
    workdir = cloud if which == "cloud" else image
    cfg = calo_config.get_config("tiny" if which == "cloud" else "tiny,image")
    metrics = json.loads((workdir / "metrics.json").read_text())
    names = run_names(cfg)  # the cloud distils both stages: ddim_1 and student_1 too
    assert metrics["representation"] == which and list(metrics["runs"]) == names
    assert ("student_1" in names) == (which == "cloud")
    levels = ("cell", "voxel") if which == "cloud" else ("voxel",)
    for name, r in metrics["runs"].items():
        run = {"method": r["method"], **r["options"]}
        expected = nfe_of(run.pop("method"), **run)
        assert r["nfe"] == expected if expected is not None else r["nfe"] > 6
        assert r["seconds"] > 0 and r["ms_per_shower"] > 0
        for level in levels:
            w1 = r[level]["w1"]
            assert set(w1) == set(metrics["floor"][level])
            assert all(np.isfinite(v) and v >= 0 for v in w1.values())
            assert 0 <= r[level]["classifier_high_level"]["auc"] <= 1
            separating = r[level]["separating_features"]
            assert len(separating) == 5 and all(0 <= f["auc"] <= 1 for f in separating)
            deviations = [abs(f["auc"] - 0.5) for f in separating]
            assert deviations == sorted(deviations, reverse=True)
        assert 0 <= r["voxel"]["classifier_voxel_image"]["auc"] <= 1
    summary = metrics["summary"]
    assert summary["parameters_stage2"] > 0 and summary["training_seconds_stage2"] > 0
    assert summary["train_step_memory_mb_stage2"] > 0
    # samples.h5 is in the point-cloud layout: the loader reads it.
    showers = calo.load(str(workdir / "samples.h5"))
    assert len(showers) == cfg.sampling.num_samples and showers.cells.shape[2] == 5
    mask = showers.mask
    assert np.all(showers.cells[..., 0][mask] >= 0)
    with h5py.File(workdir / "samples.h5", "r") as f:
        assert set(f["runs"]) == set(names)
        assert f["voxels"].shape == (cfg.sampling.num_samples, 11, 11, 11)
    for level in levels:
        for prefix in ("observables", "profiles"):
            assert (workdir / f"{prefix}_{level}.png").stat().st_size > 10_000
    assert (workdir / "nfe_vs_w1.png").exists() and (workdir / "loss_curves.png").exists()
    assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]


@pytest.mark.e2e
def test_ablation_table_reads_the_runs_metrics(runs, tmp_path):
    """benchmarks/ablation.py: one row per teacher run with the metrics.json values."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import ablation

    cloud, *_ = runs
    metrics = json.loads((cloud / "metrics.json").read_text())
    rows = ablation.calo_rows("tiny", str(cloud))
    cfg = calo_config.get_config("tiny")
    assert [r["run"] for r in rows] == list(cfg.sampling.runs)  # not the students nor their paired DDIM
    for row in rows:
        r = metrics["runs"][row["run"]]
        assert row["w1_over_floor_cell"] == r["cell"]["w1_over_floor_mean"]
        assert row["auc_voxel"] == r["voxel"]["classifier_high_level"]["auc"]
        assert row["most_separating"].startswith(r["cell"]["separating_features"][0]["feature"])
    ablation.main(["--experiment=calo", f"--out={tmp_path}", f"tiny={cloud}"])
    assert json.loads((tmp_path / "ablation_calo.json").read_text())["rows"][0]["lever"] == "tiny"


@pytest.mark.e2e
def test_two_process_run_prints_and_logs_once(runs):
    cloud, _, proc, _ = runs
    assert proc.stdout.count("results in") == 1 and proc.stdout.count("truth vs truth AUC") == 1
    cfg = calo_config.get_config("tiny")
    rows = [json.loads(line) for line in (cloud / "train_log.jsonl").read_text().splitlines()]
    for stage, section in (("cluster", cfg.train_global), ("cells", cfg.train_set), ("cluster_student_1", cfg.distill),
                           ("cells_student_1", cfg.distill)):
        assert [r["step"] for r in rows if r["stage"] == stage] == expected_log_steps(section)
        assert len(list((cloud / "tensorboard" / stage).iterdir())) == 1
    assert (cloud / "distill_loss_curves.png").stat().st_size > 1000


@pytest.mark.e2e
def test_trained_model_beats_the_untrained_one(runs):
    """Showers of the trained tiny model are closer to the truth (cell-level W1 / floor, mean over
    the observables) than those the untrained networks make from the same noise and conditions:
    measured 11.4 trained vs 14.6 untrained for EM 10. Deterministic (same keys)."""
    cloud, *_ = runs
    cfg = calo_config.get_config("tiny")
    experiment = CaloExperiment(cfg, progress=False)
    data = experiment.load_data()
    untrained = {stage.name: stage.model for stage in experiment.stages(data)}
    sampler = BatchSampler(experiment.sde, data_mesh(jax.devices()[:1]), progress=False)
    name, n = "em_10", cfg.sampling.num_samples
    key = run_key(experiment.key("sampling"), ("",), 0, list(cfg.sampling.runs).index(name))
    arrays, _ = experiment.generate(data, untrained, "", dict(cfg.sampling.runs[name]), key, sampler)
    truth_a, truth_b = data.test.take(slice(0, n)), data.test.take(slice(n, 2 * n))
    truth = calo_metrics.shower_observables(truth_a.cells, truth_a.momentum)
    floor = calo_metrics.observable_w1(truth, calo_metrics.shower_observables(truth_b.cells, truth_b.momentum))
    keep = np.asarray(arrays["finite"], bool)
    untrained_w1 = w1_block(truth, calo_metrics.shower_observables(arrays["hcal_cells"][keep], truth_a.momentum[keep]),
                            floor)["w1_over_floor_mean"]
    trained_w1 = json.loads((cloud / "metrics.json").read_text())["runs"][name]["cell"]["w1_over_floor_mean"]
    assert trained_w1 < 0.9 * untrained_w1, (trained_w1, untrained_w1)


@pytest.mark.e2e
def test_separating_features_are_recomputed_from_the_samples(runs):
    """metrics.json's separating_features of the tiny run equal a recomputation: the held-out
    showers' and the saved samples' high-level features, each column's own AUC, ranked."""
    cloud, *_ = runs
    cfg = calo_config.get_config("tiny")
    data = CaloExperiment(cfg, progress=False).load_data()
    n = cfg.sampling.num_samples
    truth = data.test.take(slice(0, n))
    metrics = json.loads((cloud / "metrics.json").read_text())
    with h5py.File(cloud / "samples.h5", "r") as f:
        cells, keep = f["hcal_cells"][:], f["finite"][:].astype(bool)
    p, th = truth.momentum[keep], truth.theta[keep]
    real = calo_metrics.high_level_features(calo_metrics.shower_observables(truth.cells[keep], p), p, th)
    fake = calo_metrics.high_level_features(calo_metrics.shower_observables(cells[keep], p), p, th)
    names = calo_metrics.high_level_feature_names(calo.EPIC_FORWARD_HCAL.num_layers)
    expected = calo_metrics.separating_features(real, fake, names)
    got = metrics["runs"][next(iter(cfg.sampling.runs))]["cell"]["separating_features"]
    assert [f["feature"] for f in got] == [f["feature"] for f in expected]
    np.testing.assert_allclose([f["auc"] for f in got], [f["auc"] for f in expected], rtol=1e-12)


@pytest.mark.e2e
def test_point_cloud_samples_respect_stage_one(runs):
    cloud, *_ = runs
    with h5py.File(cloud / "samples.h5", "r") as f:
        cells, cluster = f["hcal_cells"][()], f["cluster"][()]
    mask = cells[..., 4] > 0.5
    # Cells sit at cell centres, one per cell, and sum to the stored total.
    g = calo.EPIC_FORWARD_HCAL
    real = cells[mask]
    np.testing.assert_allclose(np.min(np.abs(real[:, 1:2] - g.cell_centres()[None]), axis=1), 0, atol=1e-2)
    np.testing.assert_allclose(np.min(np.abs(real[:, 3:4] - g.layer_centres()[None]), axis=1), 0, atol=1e-2)
    for shower, m in zip(cells, mask):
        keys = {tuple(np.round(c[1:4], 2)) for c in shower[m]}
        assert len(keys) == m.sum()
    np.testing.assert_allclose(cells[..., 0].sum(axis=1), cluster[:, 2], rtol=1e-5)


@pytest.mark.e2e
def test_comparison_table_and_eval_only_rerun(runs):
    cloud, image, _, proc_image = runs
    table = (image / "comparison.md").read_text()
    assert "| quantity | point cloud | image |" in table and "classifier AUC, voxel image" in table
    rows = json.loads((image / "comparison.json").read_text())
    assert set(rows) == {"cloud", "image"}
    assert "point cloud" in proc_image.stdout
    before = json.loads((cloud / "metrics.json").read_text())
    proc = _main(cloud, "tiny", "--mode=eval", "--config.eval.evaluators=('observables',)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((cloud / "metrics.json").read_text())
    assert "classifier_floor" not in after and "truth vs truth AUC" not in proc.stdout
    for name in before["runs"]:  # same samples: same numbers; the classifier evaluator did not run
        assert after["runs"][name]["cell"]["w1"] == before["runs"][name]["cell"]["w1"]
        assert "classifier_high_level" not in after["runs"][name]["cell"]


def test_cell_features_round_trip():
    showers = calo.simulate(50, seed=3)
    noise = np.full(showers.cells.shape[:2] + (3,), 0.5)  # no jitter
    features = transforms.cell_features(showers.cells, showers.theta, noise)
    real = showers.mask
    # The offsets from the trajectory's cell are integers, mostly small.
    np.testing.assert_array_equal(features[..., 1:][real], np.round(features[..., 1:][real]))
    assert np.median(np.abs(features[..., 1][real])) <= 1
    cells = transforms.cells_from_features(features, showers.mask, showers.theta, showers.cluster[:, 2], 200)
    np.testing.assert_allclose(cells, showers.cells, rtol=2e-4, atol=1e-6)
    # Dequantisation noise of any width up to a whole cell maps back to the same cell.
    noise = np.random.default_rng(0).random(showers.cells.shape[:2] + (3,)) * 0.998 + 0.001
    for width in (0.3, 1.0):
        features = transforms.cell_features(showers.cells, showers.theta, noise, dequantisation=width)
        cells = transforms.cells_from_features(features, showers.mask, showers.theta, showers.cluster[:, 2], 200)
        np.testing.assert_allclose(cells[..., 1:], showers.cells[..., 1:], atol=1e-3)


def test_image_transform_round_trip():
    images = calo.to_voxels(calo.simulate(30, seed=2).cells)
    total = images.sum(axis=(1, 2, 3))
    logs = transforms.image_to_log_fractions(images)
    assert logs.min() == pytest.approx(-6) and logs.max() <= 0
    np.testing.assert_allclose(transforms.log_fractions_to_image(logs, total), images, rtol=1e-5, atol=1e-9)


def test_two_points_in_one_cell_are_merged():
    cells = np.zeros((1, 3, 5), np.float32)
    g = calo.EPIC_FORWARD_HCAL
    for i, e in enumerate((0.3, 0.1, 0.2)):
        cells[0, i] = [e, g.cell_centres()[30 + (i == 2)], g.cell_centres()[27], g.layer_centres()[4], 1]
    features = transforms.cell_features(cells, np.array([17.0]), np.full((1, 3, 3), 0.5))
    out = transforms.cells_from_features(features, cells[..., 4], np.array([17.0]), np.array([1.2]), 3,
                                       resolve_collisions=False)
    assert out[0, :, 4].sum() == 2
    np.testing.assert_allclose(out[0, :2, 0], [0.8, 0.4], rtol=1e-5)  # (0.3 + 0.1, 0.2) scaled to 1.2


def test_colliding_points_move_to_the_nearest_free_cell():
    g = calo.EPIC_FORWARD_HCAL
    theta = np.array([17.0])
    track_x, track_y = transforms.track_cells(theta)
    # Three points around the track cell of layer 10: two round to the same cell; the weaker one
    # (at layer 10.1, dx = +0.3) moves to the nearest free cell in mm, the next layer (23.4 mm
    # away) rather than the next cell sideways (100 mm). The third point keeps dx = -1.
    features = np.array([[[np.log10(0.3), 0.1, 0.0, 10.0], [np.log10(0.1), 0.3, 0.1, 10.1],
                          [np.log10(0.2), -1.0, 0.0, 10.0]]], np.float32)
    out = transforms.cells_from_features(features, np.ones((1, 3)), theta, np.array([0.6]), 3)
    assert out[0, :, 4].sum() == 3
    layer, ix, iy = calo.cell_indices(out[0, :, 1:4])
    np.testing.assert_array_equal(layer, [10, 10, 11])  # sorted by energy: 0.3, 0.2, 0.1
    np.testing.assert_array_equal(ix - track_x[0, 10], [0, -1, 0])
    np.testing.assert_array_equal(iy - track_y[0, 10], [0, 0, 0])
    np.testing.assert_allclose(out[0, :, 0], [0.3, 0.2, 0.1], rtol=1e-5)
    np.testing.assert_allclose(out[0, :, 3], g.layer_centres()[[10, 10, 11]])
    # In index units the weaker point is 0.7 cells from dx = +1 and 0.9 layers from layer 11: it
    # moves sideways instead.
    out = transforms.cells_from_features(features, np.ones((1, 3)), theta, np.array([0.6]), 3,
                                         collision_metric="index")
    layer, ix, iy = calo.cell_indices(out[0, :, 1:4])
    np.testing.assert_array_equal(layer, [10, 10, 10])
    np.testing.assert_array_equal(ix - track_x[0, 10], [0, -1, 1])
    with pytest.raises(ValueError, match="unknown collision metric 'cm'"):
        transforms.cells_from_features(features, np.ones((1, 3)), theta, np.array([0.6]), 3, collision_metric="cm")


def _cfg(**overrides):
    cfg = calo_config.get_config("tiny")
    with cfg.unlocked():
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            (cfg if not section else cfg[section])[field] = value
    return cfg


@pytest.mark.parametrize("overrides, message", [
    ({"representation": "voxels"}, "representation"),
    ({"data.momentum_range": (10.0, 1.0)}, "momentum_range"),
    ({"data.buckets": (32, 0)}, "data.buckets"),
    ({"data.momentum_range": (1.0, 50.0, 100.0)}, "momentum_range.*pair"),
    ({"data.dequantisation": 1.5}, "data.dequantisation"),
    ({"cell_model.num_heads": 3}, "divisible"),
    ({"image_model.channels": (8, -16)}, "image_model.channels"),
    ({"eval.momentum_bins": (5.0, 1.0)}, "momentum_bins"),
])
def test_bad_config_values_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CaloExperiment(_cfg(**overrides), progress=False).validate(1)


@pytest.mark.e2e
def test_a_scalar_range_on_the_command_line_gives_one_clear_message(tmp_path):
    proc = _main(tmp_path / "work", "tiny", "--config.data.momentum_range=30", "--mode=train")
    assert proc.returncode == 1
    assert "config.data.momentum_range" in proc.stderr and "pair (min, max)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "work").exists()


def test_calochallenge_file_and_nan_file_are_refused(tmp_path):
    path = tmp_path / "cc.h5"
    with h5py.File(path, "w") as f:
        f["incident_energies"] = np.ones((30, 1))
        f["showers"] = np.ones((30, 10))
    with pytest.raises(ConfigError, match="CaloChallenge"):
        CaloExperiment(_cfg(**{"data.path": str(path)}), progress=False).load_data()
    showers = calo.simulate(40, seed=1)
    showers.cells[3, 0, 0] = np.nan
    bad = calo.save(showers, str(tmp_path / "nan.h5"))
    with pytest.raises(ConfigError, match="nan.h5.*NaN"):
        CaloExperiment(_cfg(**{"data.path": bad}), progress=False).load_data()


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown variant"):
        calo_config.get_config("huge")
    with pytest.raises(ValueError, match="unknown variant"):
        calo_config.get_config("full,tiny")


def test_readme_first_command_is_the_default_calo_run():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    first = text.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert first == "pip install -r requirements.txt && python experiments/main.py --config=experiments/calo.py"
    cfg = calo_config.get_config("")
    CaloExperiment(cfg, progress=False).validate(1)
    assert cfg.representation == "cloud" and not cfg.data.path  # built-in data


@pytest.mark.e2e
def test_generate_writes_showers_in_the_point_cloud_layout_at_the_asked_momenta(runs, tmp_path, monkeypatch):
    from fpcd.experiments import calo as calo_experiment
    from fpcd.runner import train_and_evaluate

    cloud, *_ = runs
    cfg = calo_config.get_config("tiny")
    state = json.loads((cloud / "generation_state.json").read_text())["state"]
    low, high = state["momentum_range"]
    cfg.generate.update(num_events=24, chunk_size=12, momentum_range=(low, (low + high) / 2),
                        output=str(tmp_path / "gen.h5"))

    def no_training_showers(*args, **kwargs):
        raise AssertionError("generate simulated training showers")

    monkeypatch.setattr(calo_experiment, "simulate", no_training_showers)
    train_and_evaluate(CaloExperiment(cfg, progress=False), str(cloud), "generate", data_mesh(jax.devices()[:1]))
    showers = calo.load(str(tmp_path / "gen.h5"))
    assert len(showers) == 24 and showers.cells.shape[2] == 5
    assert np.all(showers.momentum >= low * 0.999) and np.all(showers.momentum <= (low + high) / 2 * 1.001)
    cfg.generate.update(momentum_range=(low, 10 * high), output=str(tmp_path / "far.h5"))
    with pytest.warns(UserWarning, match="reaches outside the training range"):
        train_and_evaluate(CaloExperiment(cfg, progress=False), str(cloud), "generate", data_mesh(jax.devices()[:1]))
