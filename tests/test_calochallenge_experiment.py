"""The CaloChallenge experiment end to end (the tiny preset through experiments/main.py), its
outputs in the challenge's layout, ``--mode=generate`` (resume after a kill or a full disk,
bit-identical), and its input errors."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest

from conftest import REPO, _environment, run_main
from fpcd.data import calochallenge as cc
from fpcd.data.calo import CaloChallengeSet
from fpcd.errors import ConfigError
from fpcd.experiments.calochallenge import (CaloChallengeExperiment, GenerationState, global_targets,
                                            read_incident_energies, rescale)
from fpcd.io import DiskFullError
from fpcd.parallel import data_mesh
from fpcd.runner import run_names, train_and_evaluate
from fpcd.runner import generation

sys.path.insert(0, os.path.join(REPO, "experiments"))
import calochallenge as cc_config  # noqa: E402  (experiments/calochallenge.py)

GEOMETRY = cc.dataset_geometry("2")


def _config(**generate):
    cfg = cc_config.get_config("tiny")
    cfg.generate.update(generate)
    return cfg


def _generate(workdir, **generate):
    """``--mode=generate`` in this process; returns the output's arrays."""
    cfg = _config(**generate)
    train_and_evaluate(CaloChallengeExperiment(cfg, progress=False), str(workdir), "generate", data_mesh())
    with h5py.File(cfg.generate.output or os.path.join(workdir, generation.DEFAULT_OUTPUT), "r") as f:
        return {k: f[k][()] for k in f}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calochallenge") / "tiny"
    proc = run_main("experiments/calochallenge.py:tiny", f"--workdir={root}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


# --- the tiny run ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_tiny_run_writes_the_challenge_metrics_figures_and_samples(workdir):
    cfg = cc_config.get_config("tiny")
    metrics = json.loads((workdir / "metrics.json").read_text())
    names = run_names(cfg)
    assert list(metrics["runs"]) == names and "student_1" in names
    floor = metrics["floor"]
    # Two halves of the same held-out showers: closer to each other than any tiny model's showers
    # (measured: floor 0.25, runs 0.36-0.46), and a classifier that cannot tell them apart beyond the
    # noise of its 16 validation showers (measured 0.45-0.55).
    assert 0 < floor["separation_power"]["all"] < min(r["separation_power"]["all"] for r in metrics["runs"].values())
    for level in ("high_level", "low_level"):
        assert abs(metrics["classifier_floor"][level] - 0.5) < 0.2
    for name, r in metrics["runs"].items():
        assert r["nfe"] == (4 if name == "ddim_4" else 1) and r["ms_per_shower"] > 0
        per_feature = r["separation_power_per_feature"]
        # every high-level feature of the 45 layers (E, EC and width in eta and phi) plus E_ratio and the hits
        assert len(per_feature) == 1 + 45 * 5 + 1 and all(0 <= v <= 1 for v in per_feature.values())
        assert r["most_separating"][0] == max(per_feature, key=per_feature.get)
        layers = [v for k, v in per_feature.items() if k.startswith("E_layer_")]
        assert r["separation_power"]["E_layer"] == pytest.approx(np.mean(layers))
        assert r["separation_power"]["all"] == pytest.approx(np.mean([v for k, v in per_feature.items()
                                                                      if k != "num_hits"]))
        assert np.isfinite(r["fpd"]) and np.isfinite(r["kpd"])
        for level in ("classifier_high_level", "classifier_low_level"):
            assert 0 <= r[level]["auc"] <= 1
    # The first run is at the top level of samples.h5 in the challenge's layout: the loader reads it.
    showers = cc.load(str(workdir / "samples.h5"), GEOMETRY)
    assert len(showers) == cfg.sampling.num_samples and showers.showers.dtype == np.float32
    with h5py.File(workdir / "samples.h5", "r") as f:
        assert f["incident_energies"].shape == (cfg.sampling.num_samples, 1) and set(f["runs"]) == set(names)
    # A shower never has more hits than it was modelled with, nor a hit below the readout threshold.
    hits = showers.showers[showers.showers > 0]
    assert hits.min() >= cfg.data.threshold_mev
    assert (showers.showers > 0).sum(axis=1).max() <= cfg.data.max_points
    for figure in ("calochallenge_features", "calochallenge_profiles", "nfe_vs_separation", "loss_curves"):
        assert (workdir / f"{figure}.png").stat().st_size > 10_000
    state = json.loads((workdir / generation.GENERATION_STATE_FILE).read_text())
    assert state["experiment"] == "calochallenge" and state["state"]["dataset"] == "2"


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_generate_writes_the_challenge_layout_at_the_training_energies(workdir, tmp_path):
    out = _generate(workdir, num_events=40, output=str(tmp_path / "gen.h5"))
    assert set(out) == {"incident_energies", "showers"}
    assert out["incident_energies"].shape == (40, 1) and out["showers"].shape == (40, GEOMETRY.num_voxels)
    assert out["showers"].dtype == np.float32 and out["incident_energies"].dtype == np.float32
    state = GenerationState.from_dict(json.loads((workdir / generation.GENERATION_STATE_FILE).read_text())["state"])
    low, high = state.energy_range_mev
    assert np.all(out["incident_energies"] >= low * 0.999) and np.all(out["incident_energies"] <= high * 1.001)
    assert cc.load(str(tmp_path / "gen.h5"), GEOMETRY).showers.shape == (40, GEOMETRY.num_voxels)
    assert not os.path.exists(str(tmp_path / "gen.h5") + ".parts")
    # The response of the generated showers: E_dep / E_inc within 5 % of the held-out truth's
    # (the criterion; the tiny model's global stage learns the response within a few steps).
    truth = json.loads((workdir / "metrics.json").read_text())["truth"]["e_ratio_mean"]
    ratio = out["showers"].sum(axis=1) / out["incident_energies"][:, 0]
    assert abs(ratio.mean() / truth - 1) < 0.05


@pytest.mark.e2e
def test_generate_killed_midway_resumes_to_the_uninterrupted_file(workdir, tmp_path):
    n, chunk = 160, 16
    reference = _generate(workdir, num_events=n, chunk_size=chunk, output=str(tmp_path / "reference.h5"))
    output = tmp_path / "killed.h5"
    args = [sys.executable, os.path.join(REPO, "experiments", "main.py"), "--config=experiments/calochallenge.py:tiny",
            f"--workdir={workdir}", "--mode=generate", "--progress=false", f"--config.generate.num_events={n}",
            f"--config.generate.chunk_size={chunk}", f"--config.generate.output={output}"]
    proc = subprocess.Popen(args, cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = str(output) + ".parts"
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(parts, "chunk_000002.h5")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p for p in os.listdir(parts) if p.startswith("chunk_"))
    assert 3 <= len(written) < n // chunk and not output.exists()  # killed mid-way: some chunks, no file
    proc = run_main("experiments/calochallenge.py:tiny", f"--workdir={workdir}", "--mode=generate",
                    f"--config.generate.num_events={n}", f"--config.generate.chunk_size={chunk}",
                    f"--config.generate.output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {len(written) * chunk}/{n} events" in proc.stdout
    with h5py.File(output, "r") as f:
        resumed = {k: f[k][()] for k in f}
    assert resumed["showers"].shape[0] == n
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


@pytest.mark.e2e
def test_generate_after_a_full_disk_keeps_its_chunks_and_resumes(workdir, tmp_path, monkeypatch):
    n, chunk = 48, 16
    reference = _generate(workdir, num_events=n, chunk_size=chunk, output=str(tmp_path / "reference.h5"))
    output = tmp_path / "full.h5"
    real_save, calls = generation.save_hdf5, []

    def full_at_the_second_chunk(path, arrays, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise DiskFullError(path)
        return real_save(path, arrays, *args, **kwargs)

    monkeypatch.setattr(generation, "save_hdf5", full_at_the_second_chunk)
    with pytest.raises(DiskFullError):
        _generate(workdir, num_events=n, chunk_size=chunk, output=str(output))
    monkeypatch.setattr(generation, "save_hdf5", real_save)
    assert sorted(os.listdir(str(output) + ".parts")) == ["chunk_000000.h5", generation.MANIFEST_FILE]
    # The chunks depend on the sampling settings too: finishing with another batch size is refused.
    cfg = _config(num_events=n, chunk_size=chunk, output=str(output))
    cfg.sampling.batch_size = 8
    with pytest.raises(ConfigError, match=r"part-finished generation with other settings \(sampling\)"):
        train_and_evaluate(CaloChallengeExperiment(cfg, progress=False), str(workdir), "generate", data_mesh())
    resumed = _generate(workdir, num_events=n, chunk_size=chunk, output=str(output))
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


@pytest.mark.e2e
def test_generate_reuses_the_energies_of_a_conditions_file_and_warns_outside_the_training_range(workdir, tmp_path):
    energies = np.array([2e3, 5e3, 3e4], np.float32)  # 30 GeV is beyond the tiny run's 1-10 GeV
    cc.save(CaloChallengeSet(energies, np.zeros((3, GEOMETRY.num_voxels), np.float32)), str(tmp_path / "cond.h5"))
    with pytest.warns(UserWarning, match=r"outside the training range"):
        out = _generate(workdir, num_events=5, chunk_size=4, conditions_file=str(tmp_path / "cond.h5"),
                        output=str(tmp_path / "gen.h5"))
    np.testing.assert_array_equal(out["incident_energies"][:, 0], energies[[0, 1, 2, 0, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the training range: no warning
        _generate(workdir, num_events=4, chunk_size=4, energy_range=(2e3, 5e3), output=str(tmp_path / "in.h5"))


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["exists", "student", "sampler", "both_conditions", "gev_conditions",
                                  "no_dataset", "other_settings", "no_state"])
def test_generate_refuses_bad_requests_with_one_line(workdir, tmp_path, case):
    output = str(tmp_path / "gen.h5")
    kwargs = {"num_events": 4, "chunk_size": 4, "output": output}
    target = workdir
    if case == "exists":
        open(output, "w").close()
        match = "exists; set --config.generate.overwrite=True"
    elif case == "student":
        kwargs["sampler"], match = "student_2", r"no such student; the distillation of this config makes \['student_1'\]"
    elif case == "sampler":
        kwargs["sampler"], match = "ode_fast", "is not a run of this config; choose one of"
    elif case == "both_conditions":
        kwargs.update(energy_range=(1e3, 2e3), conditions_file="x.h5")
        match = "both set; give one"
    elif case in ("gev_conditions", "no_dataset"):
        with h5py.File(tmp_path / "cond.h5", "w") as f:
            f.create_dataset("incident_energies" if case == "gev_conditions" else "energies", data=[[5.0], [20.0]])
        kwargs["conditions_file"] = str(tmp_path / "cond.h5")
        match = "this looks like GeV" if case == "gev_conditions" else "no dataset 'incident_energies'"
    elif case == "other_settings":
        os.makedirs(output + ".parts")
        with open(os.path.join(output + ".parts", generation.MANIFEST_FILE), "w") as f:
            json.dump({"experiment": "calochallenge", "sampler": "ddim_4", "num_events": 8}, f)
        match = "part-finished generation with other settings"
    else:  # a workdir of the same run without its generation state
        target = tmp_path / "copy"
        subprocess.run(["cp", "-r", str(workdir), str(target)], check=True)
        os.remove(target / generation.GENERATION_STATE_FILE)
        match = "has no generation_state.json"
    with pytest.raises(ConfigError, match=match):
        _generate(target, **kwargs)


@pytest.mark.e2e
def test_generate_from_an_empty_workdir_says_it_holds_no_run(tmp_path):
    proc = run_main("experiments/calochallenge.py:tiny", f"--workdir={tmp_path}", "--mode=generate")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"error: workdir {tmp_path} holds no run; run with --mode=train "
                                                    "(or all) first")
    assert os.listdir(tmp_path) == []


# --- the experiment's data errors (in this process: no training) ----------------------------------


def _showers(n=60, voxels=GEOMETRY.num_voxels, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n)) * scale
    showers = np.where(rng.random((n, voxels)) < 0.05, 1.0 + rng.random((n, voxels)) * 10.0, 0.0)  # >= 1 MeV
    return CaloChallengeSet(energies.astype(np.float32), showers.astype(np.float32))


@pytest.mark.parametrize("case, match", [
    ("voxels", r"showers have 368 voxels \(the voxel count of dataset 1_photons\), but dataset 2's binning \(electron\) has 6480"),
    ("gev", r"median incident energy .*; CaloChallenge files are in MeV \(this looks like GeV\)"),
    ("nan", r"dataset 'showers' holds 1 NaN/inf values"),
    ("negative", r"negative voxel energies"),
])
def test_bad_data_files_are_refused_naming_the_problem(tmp_path, case, match):
    path = str(tmp_path / "data.h5")
    data = _showers(voxels=368 if case == "voxels" else GEOMETRY.num_voxels, scale=1e-3 if case == "gev" else 1.0)
    if case in ("nan", "negative"):
        data.showers[3, 10] = np.nan if case == "nan" else -1.0
    cc.save(data, path)
    cfg = cc_config.get_config("tiny")
    cfg.data.path = path
    with pytest.raises(ConfigError, match=match):
        CaloChallengeExperiment(cfg, progress=False).load_data()


def test_generation_state_round_trips_and_rebuilds_the_same_models():
    cfg = cc_config.get_config("tiny")
    experiment = CaloChallengeExperiment(cfg, progress=False)
    data = experiment.load_data()
    state = experiment.generation_state(data)
    rebuilt = experiment.generation_data(json.loads(json.dumps(state)))
    assert rebuilt.state.to_dict() == data.state.to_dict()
    np.testing.assert_array_equal(rebuilt.state.cond_stats.apply([[3.5]]), data.state.cond_stats.apply([[3.5]]))
    # The same templates, so that the checkpoints of training restore into them.
    import jax

    trained = [jax.tree_util.tree_structure(s.model) for s in experiment.stages(data)]
    generated = [jax.tree_util.tree_structure(s.model) for s in experiment.generation_stages(rebuilt)]
    assert trained == generated


def test_rescale_gives_each_layer_its_sampled_share_and_the_shower_its_energy():
    showers = _showers(n=5, seed=3)
    geometry = GEOMETRY
    targets = global_targets(showers, geometry, True, max_points=10_000)
    state = GenerationState.from_dict({**_unit_state(geometry), "layer_energies": True})
    # Distort the layer energies; rescaling with the true shares and totals must give them back.
    distorted = showers.showers * np.repeat(np.linspace(0.5, 2.0, geometry.num_layers), 16 * 9)[None]
    total = showers.showers.astype(np.float64).sum(axis=1)
    out = rescale(distorted, state, total, targets)
    # Every voxel is above 1 MeV, far above the threshold: nothing is cut, the sums agree to float32.
    np.testing.assert_allclose(geometry.layer_energies(out), geometry.layer_energies(showers.showers), rtol=1e-5)
    np.testing.assert_allclose(out.sum(axis=1), total, rtol=1e-5)
    assert out[out > 0].min() >= state.threshold_mev


def _unit_state(geometry):
    unit = {"mean": 0.0, "std": 1.0}
    return {"dataset": "2", "layer_energies": False, "cond_stats": unit, "global_stats": unit, "point_stats": unit,
            "max_points": 64, "lengths": [64], "energy_range_mev": [1e3, 1e6], "threshold_mev": 0.01515, "bounds": {}}


def test_read_incident_energies_refuses_an_unreadable_file(tmp_path):
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(ConfigError, match="cannot read it"):
        read_incident_energies(str(tmp_path / "bad.h5"))


def test_model_points_write_the_angle_on_the_circle_and_invert_exactly():
    from fpcd.experiments.calochallenge import model_points, voxel_points_of

    rng = np.random.default_rng(0)
    points = np.stack([rng.normal(size=(3, 50)), rng.integers(0, 45, (3, 50)) + rng.uniform(-0.25, 0.25, (3, 50)),
                       rng.integers(0, 16, (3, 50)) + rng.uniform(-0.25, 0.25, (3, 50)),
                       rng.integers(0, 9, (3, 50)) + rng.uniform(-0.25, 0.25, (3, 50))], axis=-1)
    x = model_points(points, 16)
    np.testing.assert_allclose(np.hypot(x[..., 2], x[..., 3]), 1.0, rtol=1e-12)
    back = voxel_points_of(x, 16)
    np.testing.assert_allclose(back[..., [0, 1, 3]], points[..., [0, 1, 3]], rtol=0, atol=0)
    # The angle comes back modulo the 16 bins: bin -0.2 is bin 15.8, the neighbour of bin 0.
    np.testing.assert_allclose(np.mod(back[..., 2] - points[..., 2] + 8, 16) - 8, 0.0, atol=1e-9)
    # A rotation by k bins turns every point of a shower by k bins; the layer and radius stay.
    turns = np.array([0, 3, 15])
    rotated = voxel_points_of(model_points(points, 16, turns), 16)
    np.testing.assert_allclose(np.mod(rotated[..., 2] - points[..., 2] - turns[:, None] + 8, 16) - 8, 0.0, atol=1e-9)
    # Decoding needs only the direction of (cos, sin): a model's point off the circle lands on its angle.
    np.testing.assert_allclose(voxel_points_of(x * [1, 1, 0.3, 0.3, 1], 16), back, atol=1e-9)


def test_separation_powers_use_the_challenge_bins_and_drop_what_they_do_not_hold():
    from fpcd.experiments.calochallenge_evaluation import family_means, feature_bins, separation_powers

    np.testing.assert_array_equal(feature_bins("E_ratio", [1.0], 10), np.linspace(0.5, 1.5, 101))
    np.testing.assert_array_equal(feature_bins("EC_eta_3", [0.0], 10), np.linspace(-30, 30, 101))
    np.testing.assert_array_equal(feature_bins("width_phi_3", [0.0], 10), np.linspace(0, 30, 101))
    layer_bins = feature_bins("E_layer_3", [5.0, 200.0], 10)
    assert len(layer_bins) == 40 and layer_bins[0] == pytest.approx(0.01515, rel=1e-3)
    assert layer_bins[-1] == pytest.approx(200.0)
    rng = np.random.default_rng(1)
    energies = rng.lognormal(2.0, 1.0, 4000)
    # An empty layer (0 MeV) is below the first bin: left out, as in the challenge, so a sample that
    # differs from the reference only by empty layers has the reference's histogram.
    reference = {"E_layer_3": np.concatenate([energies, np.zeros(2000)]), "E_ratio": rng.uniform(0.9, 1.0, 100),
                 "num_hits": rng.integers(100, 200, 100).astype(float)}
    generated = {"E_layer_3": energies, "E_ratio": rng.uniform(0.2, 0.4, 100), "num_hits": reference["num_hits"]}
    powers = separation_powers(reference, generated, 10)
    assert powers["E_layer_3"] == 0.0 and powers["num_hits"] == 0.0
    assert powers["E_ratio"] == 1.0  # every generated value below the challenge's 0.5: as separated as can be
    means = family_means({"E_ratio": 0.2, "E_layer_1": 0.1, "E_layer_2": 0.3, "num_hits": 0.9})
    assert means["E_layer"] == pytest.approx(0.2) and means["all"] == pytest.approx(0.6 / 3)  # num_hits left out
