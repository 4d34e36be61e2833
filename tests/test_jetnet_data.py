"""The Pythia 8 + FastJet jet generator (physics, determinism, silence), files, loader, transforms."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fpcd.data import common, jet_transforms, jetnet
from fpcd.data.jetnet import (
    JET_TYPES, GeneratorSettings, JetDataError, JetSet, cached_generate, generate, load, save,
)
from fpcd.data.workers import WorkerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_JETS = 300
# Physical masses [GeV] (PDG) and where our default jets sit: the underlying event and the 1 GeV
# particle threshold leave the t/W/Z median jet mass within a few percent of the pole mass
# (measured on 400 jets: t +1%, W +3%, Z +2%).
POLE_MASS = {"t": 172.6, "w": 80.4, "z": 91.2}


@pytest.fixture(scope="module")
def jets():
    return {t: generate(t, NUM_JETS, num_particles=150, seed=7, workers=2, progress=False) for t in JET_TYPES}


@pytest.mark.e2e
@pytest.mark.parametrize("jet_type", ["t", "w", "z"])
def test_median_mass_sits_at_the_decaying_particle(jets, jet_type):
    median = float(np.median(jets[jet_type].jet_features[:, 2]))
    assert 0.97 * POLE_MASS[jet_type] < median < 1.08 * POLE_MASS[jet_type], median


@pytest.mark.e2e
def test_mass_ordering_w_z_t_and_qcd_lighter_than_top(jets):
    med = {t: np.median(jets[t].jet_features[:, 2]) for t in JET_TYPES}
    assert med["w"] < med["z"] < med["t"]
    assert med["q"] < med["g"] < med["t"]


@pytest.mark.e2e
def test_underlying_event_without_threshold_pushes_the_mass_up():
    """The plain recipe (all particles clustered) adds the full underlying event inside R = 0.8:
    measured on 400 jets it raises the median mass by t +6%, W +17%, Z +14% over the default."""
    plain = GeneratorSettings(min_particle_pt=0.0)
    for jet_type, low, high in (("t", 1.02, 1.15), ("w", 1.06, 1.30), ("z", 1.05, 1.28)):
        default = generate(jet_type, 150, seed=3, workers=2, progress=False).jet_features[:, 2]
        pushed = generate(jet_type, 150, seed=3, workers=2, progress=False, settings=plain).jet_features[:, 2]
        ratio = np.median(pushed) / np.median(default)
        assert low < ratio < high, (jet_type, ratio)


@pytest.mark.e2e
def test_quark_jets_have_fewer_constituents_than_gluon_jets(jets):
    assert jets["q"].jet_features[:, 3].mean() < 0.8 * jets["g"].jet_features[:, 3].mean()


@pytest.mark.e2e
def test_multiplicities_match_jetnet_means(jets):
    """JetNet150 mean multiplicities (physics note, training split); the defaults were chosen to match."""
    jetnet_mean = {"g": 66.6, "q": 38.3, "t": 63.0, "w": 38.6, "z": 40.2}
    for jet_type, expected in jetnet_mean.items():
        assert abs(jets[jet_type].jet_features[:, 3].mean() / expected - 1) < 0.12, jet_type


@pytest.mark.e2e
@pytest.mark.parametrize("jet_type", JET_TYPES)
def test_layout_and_kinematics(jets, jet_type):
    js = jets[jet_type]
    p, f = js.particle_features, js.jet_features
    assert p.dtype == np.float32 and f.dtype == np.float32 and p.shape == (NUM_JETS, 150, 4)
    real = js.mask
    np.testing.assert_array_equal(real.sum(1), f[:, 3])  # mask count = stored multiplicity
    assert np.all(p[~real] == 0.0)  # padding rows all zero
    assert np.all(real[:, :-1] >= real[:, 1:])  # real constituents first
    pt_rel = np.where(real, p[..., 2], -1.0)
    assert np.all(np.diff(pt_rel, axis=1) <= 0)  # sorted by pT
    assert np.all((f[:, 0] > 800) & (f[:, 0] < 1600)) and np.all(np.abs(f[:, 1]) < 2.5)
    # pT fractions of all constituents sum to ~1 (scalar vs vector sum), of the 30 leading to a bit less
    assert 0.99 < np.median(p[..., 2].sum(1)) < 1.03
    assert 0.85 < np.median(p[:, :30, 2].sum(1)) <= 1.01
    # constituents inside the jet radius (phi wrapped); a few soft massive hadrons sit just outside
    # in pseudorapidity, since anti-kT clusters in rapidity.
    d_r = np.hypot(p[..., 0], p[..., 1])
    assert np.all(np.abs(p[..., 1]) <= np.pi)
    assert (real & (d_r < 0.8)).sum() / real.sum() > 0.99
    assert np.sum(p[..., 2] * real * (d_r < 0.8)) / np.sum(p[..., 2] * real) > 0.999


@pytest.mark.e2e
def test_same_seed_gives_identical_arrays_whatever_the_worker_count():
    one = generate("w", 10, seed=5, workers=1, chunk_size=4, progress=False)
    two = generate("w", 10, seed=5, workers=2, chunk_size=4, progress=False)  # 3 chunks on 2 workers
    np.testing.assert_array_equal(one.particle_features, two.particle_features)
    np.testing.assert_array_equal(one.jet_features, two.jet_features)
    other = generate("w", 4, seed=6, workers=1, chunk_size=4, progress=False)  # the first chunk only
    assert not np.array_equal(one.jet_features[:4], other.jet_features)


PLAIN_SCRIPT = """
import jax  # noqa: F401
import numpy as np

from fpcd.data import jetnet
from fpcd.metrics import jets  # noqa: F401  (imports jax too, as analysis scripts do)

with open("runs.txt", "a") as f:
    f.write("run\\n")
js = jetnet.generate("q", 6, seed=11, workers=2, chunk_size=3)
np.savez("jets.npz", particles=js.particle_features, features=js.jet_features)
"""


@pytest.mark.e2e
def test_plain_script_without_main_guard_runs_once_with_workers(tmp_path):
    """A plain script (no `if __name__ == "__main__":`) that imports jax and generates with
    workers=2 runs once: the workers are fresh interpreters that never re-run the caller's script
    (multiprocessing's spawn would, and fail with BrokenProcessPool)."""
    (tmp_path / "analysis.py").write_text(PLAIN_SCRIPT)
    proc = subprocess.run([sys.executable, "analysis.py"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs.txt").read_text() == "run\n"
    assert "6/6" in proc.stderr  # the progress bar reached the end
    saved = np.load(tmp_path / "jets.npz")
    one = generate("q", 6, seed=11, workers=1, chunk_size=3, progress=False)
    np.testing.assert_array_equal(saved["particles"], one.particle_features)
    np.testing.assert_array_equal(saved["features"], one.jet_features)


@pytest.mark.e2e
def test_a_generator_error_in_a_worker_names_the_chunk_and_the_message():
    bad = GeneratorSettings(extra=("Bogus:setting = 1",))
    with pytest.raises(WorkerError, match=r"task \d of fpcd.data.jetnet:_generate_chunk failed in worker process "
                                          r"\d+: ValueError: Pythia rejected the setting 'Bogus:setting = 1'"):
        generate("q", 4, chunk_size=2, workers=2, settings=bad, progress=False)


@pytest.mark.e2e
def test_generation_is_silent(capfd):
    generate("q", 5, seed=1, workers=1, progress=False)
    out, err = capfd.readouterr()
    assert "PYTHIA" not in out + err and "FastJet" not in out + err, (out + err)[:500]


@pytest.mark.e2e
def test_command_line_writes_a_loadable_file(tmp_path):
    out = tmp_path / "z30.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "fpcd.data.jetnet", "--jet_type=z", "--num_jets=12", "--num_particles=30",
         f"--out={out}", "--workers=1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    js = load(str(out))
    assert js.jet_type == "z" and js.particle_features.shape == (12, 30, 4)
    assert "wrote 12 z jets" in proc.stdout


@pytest.mark.e2e
def test_cache_generates_once_then_reuses(tmp_path):
    first = cached_generate("q", 10, seed=2, cache_dir=str(tmp_path), workers=1, progress=False)
    files = list((tmp_path / "jetnet").iterdir())
    assert len(files) == 1 and files[0].suffix == ".h5"
    stamp = files[0].stat().st_mtime_ns
    second = cached_generate("q", 10, seed=2, cache_dir=str(tmp_path), workers=1, progress=False)
    assert files[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.particle_features, second.particle_features)
    cached_generate("q", 10, seed=2, cache_dir=str(tmp_path), workers=1, progress=False,
                    settings=GeneratorSettings(mpi=False))
    assert len(list((tmp_path / "jetnet").iterdir())) == 2  # settings are part of the key


def _jetnet_file(path, n=6, p=30, **overrides):
    particles = np.zeros((n, p, 4), np.float32)
    particles[:, :3] = [0.1, -0.05, 0.4, 1.0]
    particles[:, 3:10] = [0.01, 0.02, 0.05, 1.0]
    jet = np.tile(np.array([1000.0, 0.3, 80.0, 10.0], np.float32), (n, 1))
    data = {"particle_features": particles, "jet_features": jet, **overrides}
    with h5py.File(path, "w") as f:
        for name, value in data.items():
            if value is not None:
                f.create_dataset(name, data=value)
    return path


def test_loads_the_public_layout_and_infers_the_type_from_the_name(tmp_path):
    js = load(str(_jetnet_file(tmp_path / "t150.hdf5", p=150)))
    assert js.jet_type == "t" and js.num_particles == 150
    short = load(str(tmp_path / "t150.hdf5"), num_particles=5)
    assert short.particle_features.shape == (6, 5, 4)
    assert np.all(short.jet_features[:, 3] == 5)  # clipped as jetnet's loader does
    assert load(str(_jetnet_file(tmp_path / "w.hdf5"))).jet_type == "w"


@pytest.mark.e2e
def test_round_trip_through_save(tmp_path, jets):
    path = save(jets["g"], str(tmp_path / "sub" / "g.h5"))
    back = load(path)
    assert back.jet_type == "g"
    np.testing.assert_array_equal(back.particle_features, jets["g"].particle_features)


@pytest.mark.parametrize(
    "name,overrides,kwargs,match",
    [
        ("g.hdf5", {"jet_features": None}, {}, "missing dataset 'jet_features'"),
        ("g.hdf5", {"particle_features": np.zeros((6, 30, 3), np.float32)}, {}, r"particle_features has shape \(6, 30, 3\)"),
        ("g.hdf5", {"jet_features": np.zeros((6, 3), np.float32)}, {}, "jet_features has shape"),
        ("g.hdf5", {"jet_features": np.zeros((5, 4), np.float32)}, {}, "6 jets in particle_features but 5"),
        ("g.hdf5", {"jet_features": np.full((6, 4), np.nan, np.float32)}, {}, "NaN"),
        ("jets.hdf5", {}, {}, "cannot tell the jet type"),
        ("g.hdf5", {}, {"jet_type": "t"}, "holds 'g' jets, not 't'"),
        ("g.hdf5", {}, {"num_particles": 150}, "cannot give num_particles=150"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, name, overrides, kwargs, match):
    path = _jetnet_file(tmp_path / name, **overrides)
    with pytest.raises(JetDataError, match=match) as info:
        load(str(path), **kwargs)
    assert str(path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(JetDataError, match="no such file"):
        load(str(tmp_path / "nope.h5"))
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(JetDataError, match="not a readable hdf5"):
        load(str(tmp_path / "junk.h5"))


def test_unknown_jet_type_is_rejected():
    with pytest.raises(ValueError, match="unknown jet type 'b'"):
        generate("b", 10)


@pytest.mark.e2e
def test_preprocessing_round_trip_keeps_padding_zero(jets):
    js = jets["t"]
    centred = JetSet("t", jet_transforms.recenter(js.particle_features), js.jet_features)
    np.testing.assert_allclose(jet_transforms.recenter(centred.particle_features), centred.particle_features,
                               atol=1e-6)  # idempotent
    stats = jet_transforms.fit_standardisation(centred)
    particles, mask, jet = jet_transforms.preprocess(centred, stats)
    assert np.all(particles[mask == 0] == 0.0)
    real = mask > 0
    np.testing.assert_allclose(particles[real].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(particles[real].std(0), 1.0, atol=1e-3)
    back = jet_transforms.postprocess(particles, mask, jet, stats, "t")
    np.testing.assert_allclose(back.particle_features, centred.particle_features, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(back.jet_features[:, 3], centred.jet_features[:, 3])
    np.testing.assert_allclose(back.jet_features, centred.jet_features, rtol=1e-5)
    assert np.all(back.particle_features[~centred.mask] == 0.0)
    restored = jet_transforms.JetStandardisation.from_dict(stats.to_dict())
    np.testing.assert_array_equal(restored.jet.mean, stats.jet.mean)


@pytest.mark.e2e
def test_recentred_jets_have_zero_centroid(jets):
    p = jet_transforms.recenter(jets["w"].particle_features)
    w = p[..., 2] * (p[..., 3] > 0.5)
    np.testing.assert_allclose((p[..., 0] * w).sum(1), 0.0, atol=1e-5)
    np.testing.assert_allclose((p[..., 1] * w).sum(1), 0.0, atol=1e-5)


@pytest.mark.e2e
def test_compare_plot_is_written(tmp_path, jets):
    from fpcd.plots.jets import compare

    path = compare(jets["t"], {"w": jets["w"], "z": jets["z"]}, str(tmp_path / "cmp.png"))
    assert os.path.getsize(path) > 10_000


# --- physically invalid files ---------------------------------------------------------------


def jets_file(path, particles, features=None):
    if features is None:
        features = np.tile(np.array([1000.0, 0.3, 80.0, 3.0], np.float32), (len(particles), 1))
    with h5py.File(path, "w") as f:
        f["particle_features"] = particles
        f["jet_features"] = features
        f.attrs["jet_type"] = "g"
    return str(path)


def _particles():
    particles = np.zeros((5, 6, 4), np.float32)
    particles[:, :3] = [0.1, -0.05, 0.4, 1.0]
    return particles


JET_CASES = [
    ("negative_pt_rel", r"a real particle \(mask 1\) has pt_rel \(column 2\) <= 0 in 1 jet\(s\) \(first: jet 3, "
                        r"particle 1, value -0.2\)"),
    ("zero_pt_rel", r"a real particle \(mask 1\) has pt_rel \(column 2\) <= 0 .* \(first: jet 0, particle 2, value 0\)"),
    ("pt_rel_above_one", r"a real particle has pt_rel \(column 2\) > 1 in 1 jet\(s\) \(first: jet 4, particle 0, "
                         r"value 1.5\)"),
    ("mask_not_binary", r"the mask \(column 3\) is neither 0 nor 1 .* \(first: jet 1, particle 4, value 0.5\)"),
    ("empty_jet", r"1 jet\(s\) have no real particle \(mask all 0; first: jet 2\)"),
    ("all_masks_zero", r"5 jet\(s\) have no real particle \(mask all 0; first: jet 0\)"),
    ("jet_pt_zero", r"dataset 'jet_features': the jet pT \(column 0\) is not positive .* \(first: jet 1, value 0\)"),
]


@pytest.mark.parametrize("case, message", JET_CASES, ids=[case for case, _ in JET_CASES])
def test_jets_loader_refuses_physically_invalid_jets(tmp_path, case, message):
    particles, features = _particles(), None
    if case == "negative_pt_rel":
        particles[3, 1, 2] = -0.2
    elif case == "zero_pt_rel":
        particles[0, 2, 2] = 0.0
    elif case == "pt_rel_above_one":
        particles[4, 0, 2] = 1.5
    elif case == "mask_not_binary":
        particles[1, 4, 3] = 0.5
    elif case == "empty_jet":
        particles[2] = 0.0
    elif case == "all_masks_zero":
        particles[..., 3] = 0.0
    elif case == "jet_pt_zero":
        features = np.tile(np.array([1000.0, 0.3, 80.0, 3.0], np.float32), (5, 1))
        features[1, 0] = 0.0
    path = jets_file(tmp_path / "g.hdf5", particles, features)
    with pytest.raises(jetnet.JetDataError, match=message) as info:
        jetnet.load(path)
    assert str(info.value).startswith(path)


def test_jets_loader_keeps_valid_jets_and_rounding(tmp_path):
    particles = _particles()
    particles[0, 0, 2] = 1.0000005  # float32 rounding of a constituent carrying the whole jet
    jets = jetnet.load(jets_file(tmp_path / "g.hdf5", particles))
    assert len(jets) == 5 and jets.mask.sum() == 15


def _no_workers(*args, **kwargs):
    raise AssertionError("the generator started its workers: the arguments were not checked first")


@pytest.mark.parametrize("call, name", [
    (lambda: jetnet.generate("g", 3.5, workers=1, progress=False), "num_jets"),
    (lambda: jetnet.generate("g", 3, num_particles=True, workers=1, progress=False), "num_particles"),
    (lambda: jetnet.generate("g", 3, chunk_size=0, workers=1, progress=False), "chunk_size"),
    (lambda: jetnet.GeneratorSettings(pthat_min=1000.0, pthat_max=900.0), "pthat_min"),
    (lambda: jetnet.GeneratorSettings(jet_radius=0.0), "jet_radius"),
    (lambda: jetnet.GeneratorSettings(jet_pt_max=np.inf), "jet_pt_max"),
], ids=["jetnet num_jets", "jetnet num_particles", "jetnet chunk_size", "jetnet pthat", "jetnet jet_radius",
        "jetnet jet_pt_max"])
def test_generator_refuses_bad_numeric_arguments_before_starting(monkeypatch, call, name):
    monkeypatch.setattr(common, "map_chunks", _no_workers)
    with pytest.raises(ValueError, match=name):
        call()
