"""EIC DIS events: the Pythia 8 generator against the physics note and exact kinematics, the files
and their errors, the features and their exact inverses, and the physics checks."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fpcd.data import common, eic, kinematics
from fpcd.data import eic_transforms as transforms
from fpcd.metrics import eic as eic_metrics

NUM_EVENTS = 2000


@pytest.fixture(scope="module")
def events():
    return eic.generate(NUM_EVENTS, seed=3, workers=2, chunk_size=500, progress=False)


@pytest.mark.e2e
def test_layout_and_ordering(events):
    p = events.particles
    assert p.shape == (NUM_EVENTS, 50, 5) and events.kinematics.shape == (NUM_EVENTS, 4)
    assert np.all(p[:, 0, 3] == 11)  # row 0: the scattered e- (beam e-; charged current off)
    real = events.mask
    assert np.all(p[~real] == 0)  # zero padding
    assert not np.any(real[:, 1:] & ~real[:, :-1])  # real entries first
    pt = np.where(real[:, 1:], p[:, 1:, 0], -1.0)
    assert np.all(np.diff(pt, axis=1)[real[:, 2:]] <= 0)  # others in decreasing pT
    assert np.all(eic.species_index(p[..., 3][real]) >= 0)  # every particle in one of the 9 classes
    # Species fractions of the particles after the electron (40,000 events: gamma 46.6 %, pi 38.3 %);
    # 4 binomial standard errors of ~44,000 particles: 1 %.
    fractions = np.bincount(eic.species_index(p[:, 1:, 3][real[:, 1:]]), minlength=9) / real[:, 1:].sum()
    assert abs(fractions[eic.SPECIES.index("gamma")] - 0.466) < 0.01
    assert abs(fractions[eic.SPECIES.index("pi")] - 0.383) < 0.01
    assert np.all(np.abs(p[..., 2][real]) <= np.pi)


@pytest.mark.e2e
def test_means_match_the_physics_note(events):
    """The note's sample (Q^2 > 25, CM frame): electron pT 6.50 +- 2.83 GeV, eta -2.53 +- 0.45,
    multiplicity 22.2 +- 9.3 (before the cap), Q^2 median 41 GeV^2. Tolerances: 4 standard errors
    of the mean for 2,000 events (the median: 10 %)."""
    e = events.electron
    n = np.sqrt(NUM_EVENTS)
    assert abs(e[:, 0].mean() - 6.50) < 4 * 2.83 / n
    assert abs(e[:, 1].mean() - (-2.53)) < 4 * 0.45 / n
    assert abs(events.multiplicity.mean() - 22.2) < 4 * 9.3 / n
    assert abs(np.median(events.kinematics[:, 0]) - 41.0) < 4.1
    assert events.kinematics[:, 0].min() >= 25.0 * (1 - 1e-4)  # PhaseSpace:Q2Min, seen by the electron method


@pytest.mark.e2e
def test_conservation_holds_on_complete_events(events):
    """Charges sum to 0 and z to 2 over every event that fits in 50 rows (beam masses included in
    sqrt(s)); measured max |sum z - 2| = 2e-7 (float32)."""
    complete = events.mask[:, -1] == 0
    assert complete.mean() > 0.97  # the note: 0.8 % of events exceed 50 particles
    assert np.all(eic_metrics.charge_sums(events)[complete] == 0)
    np.testing.assert_allclose(eic_metrics.z_sums(events)[complete], 2.0, atol=2e-6)
    assert np.max(eic_metrics.pt_imbalance(events)[complete]) < 1e-5  # and the transverse momenta balance
    # z = 2 E / sqrt(s) is rebuilt from (pT, eta) and the class mass to float32 precision.
    p = events.particles
    mass = eic.SPECIES_MASS[np.maximum(eic.species_index(p[..., 3]), 0)]
    z = 2 * kinematics.energies(p[..., 0], p[..., 1], mass) / eic.sqrt_s()
    np.testing.assert_allclose(z[events.mask], p[..., 4][events.mask], rtol=2e-6, atol=1e-7)


@pytest.mark.e2e
def test_kinematics_match_the_lab_frame_formulas(events):
    """Q^2 = 2 E E' (1 + cos theta) and y = 1 - E'/E (1 - cos theta)/2 with the electron boosted back to
    the lab (theta from the proton direction), pT^2 = Q^2 (1 - y), x = Q^2 / (s y), W^2 = M^2 + Q^2 (1-x)/x
    (the note's electron-method formulas; massless electron, so 1e-5 relative)."""
    pt, eta = events.electron[:, 0].astype(np.float64), events.electron[:, 1].astype(np.float64)
    e_cm, pz_cm = pt * np.cosh(eta), pt * np.sinh(eta)
    e_lab, pz_lab = kinematics.boost_z(e_cm, pz_cm, -eic.cm_boost_beta())
    cos_theta = pz_lab / e_lab
    q2 = 2 * eic.ELECTRON_ENERGY * e_lab * (1 + cos_theta)
    y = 1 - e_lab / eic.ELECTRON_ENERGY * (1 - cos_theta) / 2
    s = 4 * eic.ELECTRON_ENERGY * eic.PROTON_ENERGY
    k = events.kinematics.astype(np.float64)
    np.testing.assert_allclose(k[:, 0], q2, rtol=1e-5)
    np.testing.assert_allclose(k[:, 2], y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pt**2, q2 * (1 - y), rtol=1e-4)
    np.testing.assert_allclose(k[:, 1], q2 / (s * y), rtol=1e-3)
    np.testing.assert_allclose(k[:, 3] ** 2, eic.PROTON_MASS**2 + k[:, 0] * (1 - k[:, 1]) / k[:, 1], rtol=1e-4)
    assert np.all((k[:, 2] > 0) & (k[:, 2] <= 1) & (k[:, 1] > 0) & (k[:, 1] <= 1))


@pytest.mark.e2e
def test_same_seed_same_events_whatever_the_workers():
    one = eic.generate(30, seed=5, workers=1, chunk_size=12, progress=False)
    two = eic.generate(30, seed=5, workers=2, chunk_size=12, progress=False)  # 3 chunks on 2 workers
    np.testing.assert_array_equal(one.particles, two.particles)
    other = eic.generate(12, seed=6, workers=1, chunk_size=12, progress=False)
    assert not np.array_equal(other.particles, one.particles[:12])


def test_charges_and_species_tables():
    pdg = np.array([2212, -2212, 2112, -2112, 321, -321, 211, -211, 12, -14, 16, 13, -13, 11, -11, 22, 130, 0, 310])
    charge = [1, -1, 0, 0, 1, -1, 1, -1, 0, 0, 0, -1, 1, -1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(eic.charge_of(pdg), charge)
    cls = eic.species_index(pdg)
    np.testing.assert_array_equal(cls, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8, -1, -1])
    known = cls >= 0
    back = eic.pdg_from_species(cls[known], eic.charge_of(pdg[known]))
    same = np.isin(np.abs(pdg[known]), [2112, 12, 16]) | (np.abs(pdg[known]) == 14)
    np.testing.assert_array_equal(back[~same], pdg[known][~same])  # exact but for n-bar and neutrino flavour
    np.testing.assert_array_equal(np.abs(back[same]), np.where(np.abs(pdg[known][same]) == 2112, 2112, 14))


@pytest.mark.e2e
def test_features_invert_exactly(events):
    features, real = transforms.particle_features(events)
    assert features.shape == (NUM_EVENTS, 49, 13)
    assert np.all(features[..., 4:][real].sum(axis=-1) == 1)  # one-hot
    charge = eic.charge_of(events.particles[:, 1:, 3])
    np.testing.assert_array_equal(features[..., 3], charge)  # true charge: photons and neutrons 0
    # The recoil sits near phi = 0 (the hadronic system balances the electron).
    assert abs(np.median(features[..., 1][real])) < 0.2
    back = transforms.events_from_features(transforms.event_features(events), features, real,
                                           events.electron[:, 2])
    assert_same_events(back, events)
    stats = transforms.fit_standardisation(events)
    event_std, x, mask, phi_e = transforms.to_model(events, stats)
    assert x.shape == (NUM_EVENTS, 49, 14)
    assert np.all(x[mask == 0] == 0) and set(np.unique(x[..., 5:][mask > 0])) == {-1.0, 1.0}
    np.testing.assert_allclose(x[..., [0, 3]][mask > 0].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.hypot(x[..., 1], x[..., 2])[mask > 0], 1, rtol=1e-6)
    assert_same_events(transforms.from_model(event_std, x, mask, phi_e, stats), events)
    assert transforms.sharp_fraction(x, mask) == 1.0
    assert transforms.sharp_fraction(0.4 * x, mask) == 0.0


def assert_same_events(back, events):
    real = events.mask
    np.testing.assert_array_equal(back.mask, real)
    for column, (rtol, atol) in enumerate(((1e-5, 0), (0, 1e-5), (0, 1e-5))):
        np.testing.assert_allclose(back.particles[..., column][real], events.particles[..., column][real], rtol=rtol,
                                   atol=atol)
    np.testing.assert_allclose(back.particles[..., 4][real], events.particles[..., 4][real], rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(back.charges, events.charges)
    np.testing.assert_array_equal(eic.species_index(back.particles[..., 3]),
                                  eic.species_index(events.particles[..., 3]))
    np.testing.assert_allclose(back.kinematics, events.kinematics, rtol=2e-4)


def test_decoded_species_are_valid_with_consistent_charges():
    one_hot = np.full((4, 9), -1.0)
    one_hot[0, 7] = 0.2  # gamma with a charge entry of 0.9: neutral
    one_hot[1, 3] = 0.9  # pi with charge -0.3: pi-
    one_hot[2, 0] = 1.1  # p with charge +0.0: p
    one_hot[3, 6] = 0.6  # e with charge 0.7: e+
    cls, charge = transforms.decode_species(one_hot, np.array([0.9, -0.3, 0.0, 0.7]))
    np.testing.assert_array_equal(cls, [7, 3, 0, 6])
    np.testing.assert_array_equal(charge, [0, -1, 1, 1])
    np.testing.assert_array_equal(eic.pdg_from_species(cls, charge), [22, -211, 2212, -11])


@pytest.mark.e2e
def test_conservation_metrics_see_a_broken_event(events):
    good = events.take(np.flatnonzero(events.mask[:, -1] == 0)[:50])
    particles = good.particles.copy()
    particles[0, 1, 3] = -particles[0, 1, 3] if eic.charge_of(particles[0, 1, 3]) != 0 else 211
    particles[1, 1, 0] *= 3.0  # an energy excess
    particles[1, 1, 4] *= 3.0
    broken = eic.EventSet(particles, good.kinematics)
    c = eic_metrics.conservation(broken)
    assert c["fraction_charge_conserved"] == pytest.approx(49 / 50)
    assert c["fraction_z_sum_within_5_percent"] <= 49 / 50
    assert c["fraction_pt_balanced_within_5_percent"] <= 49 / 50
    intact = eic_metrics.conservation(good)
    assert intact["fraction_charge_conserved"] == intact["fraction_pt_balanced_within_5_percent"] == 1.0


@pytest.mark.e2e
def test_w1_block_and_classifier_features(events):
    a, b = events.take(slice(0, 1000)), events.take(slice(1000, 2000))
    obs_a, obs_b = eic_metrics.observables(a), eic_metrics.observables(b)
    same = eic_metrics.w1_block(obs_a, obs_a)
    assert all(v == 0 for v in same["w1"].values())
    floor = eic_metrics.w1_block(obs_a, obs_b)
    assert all(v > 0 for v in floor["w1"].values())
    # Shifting every particle's eta by 0.5 gives W1(eta) = 0.5.
    shifted = b.particles.copy()
    shifted[:, 1:, 1] += np.where(b.mask[:, 1:], 0.5, 0.0)
    obs_s = eic_metrics.observables(eic.EventSet(shifted, b.kinematics))
    assert eic_metrics.w1_block(obs_b, obs_s)["w1"]["eta"] == pytest.approx(0.5, rel=1e-6)
    ratios = eic_metrics.ratios_to_floor(floor, floor)
    assert ratios["w1_over_floor_max"] == pytest.approx(1.0)
    x = eic_metrics.classifier_features(a)
    assert x.shape == (1000, 13 + 9 + 4 * eic_metrics.LEADING) and np.all(np.isfinite(x))
    assert eic_metrics.classifier_features(a, sums=False).shape == (1000, 10 + 9 + 4 * eic_metrics.LEADING)


@pytest.mark.e2e
def test_save_load_and_cache(events, tmp_path):
    path = eic.save(events.take(slice(0, 20)), str(tmp_path / "e.h5"), seed=3)
    loaded = eic.load(path)
    np.testing.assert_array_equal(loaded.particles, events.particles[:20])
    np.testing.assert_array_equal(loaded.kinematics, events.kinematics[:20])
    # A file without kinematics (the public particle files) gets it from the electron.
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["particles"] = events.particles[:20]
    # (recomputed from the float32 electron: x, y, W to ~3e-5)
    np.testing.assert_allclose(eic.load(str(tmp_path / "p.h5")).kinematics, events.kinematics[:20], rtol=1e-4)
    first = eic.cached_generate(10, seed=2, cache_dir=str(tmp_path), workers=1, progress=False)
    cached = os.listdir(tmp_path / "eic")
    assert len(cached) == 1
    second = eic.cached_generate(10, seed=2, cache_dir=str(tmp_path), workers=1, progress=False)
    np.testing.assert_array_equal(first.particles, second.particles)
    eic.cached_generate(10, seed=2, q2_min=50.0, cache_dir=str(tmp_path), workers=1, progress=False)
    assert len(os.listdir(tmp_path / "eic")) == 2  # other settings, other file


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("no_dataset", "missing dataset 'particles'"),
    ("shape", r"particles has shape \(5, 50, 4\)"),
    ("nan", "NaN/inf"),
    ("species", r"PDG ids \[310\] are outside the 9 species classes"),
    ("gap", "event 0 has padding"),
    ("electron", "no electron in row 0"),
    ("kinematics", r"kinematics has shape \(4, 4\)"),
    ("zero_pt", r"1 real particles have pT <= 0 \(first: event 2, row 1\)"),
])
@pytest.mark.e2e
def test_bad_files_are_refused_with_the_file_named(events, tmp_path, case, message):
    path = tmp_path / f"{case}.h5"
    particles = events.particles[:5].copy()
    kinematics = events.kinematics[:5]
    if case == "nan":
        particles[2, 3, 1] = np.nan
    elif case == "species":
        particles[1, 2, 3] = 310
    elif case == "gap":
        n = int(events.mask[0].sum())
        particles[0, 1] = 0
        assert n > 2
    elif case == "electron":
        particles[3, 0, 3] = 22
    elif case == "shape":
        particles = particles[..., :4]
    elif case == "kinematics":
        kinematics = kinematics[:4]
    elif case == "zero_pt":
        particles[2, 1, 0] = 0.0
    if case != "missing":
        with h5py.File(path, "w") as f:
            if case != "no_dataset":
                f["particles"] = particles
            f["kinematics"] = kinematics
    with pytest.raises(eic.EicDataError, match=message) as err:
        eic.load(str(path))
    assert str(path) in str(err.value)


@pytest.mark.e2e
def test_command_line_generator(tmp_path):
    """``python -m fpcd.data.eic`` with two workers (its settings must unpickle in them)."""
    out = tmp_path / "dis.h5"
    proc = subprocess.run([sys.executable, "-m", "fpcd.data.eic", "--num_events", "40", "--chunk_size", "20", "--out", str(out),
                           "--workers", "2", "--q2_min", "100"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "events/s" in proc.stdout and "wrote 40 events" in proc.stdout
    events = eic.load(str(out))
    assert len(events) == 40 and events.kinematics[:, 0].min() >= 100 * (1 - 1e-4)


@pytest.mark.e2e
def test_dis_variables_are_an_exact_bijection_of_the_electron(events):
    """The stage-1 model space: (Q^2, y) of a massless electron and back; they agree with the
    electron-method kinematics of the generator (electron mass 0.5 MeV: 1e-6 relative)."""
    pt, eta = events.electron[:, 0].astype(np.float64), events.electron[:, 1].astype(np.float64)
    q2, y = transforms.dis_from_electron(pt, eta)
    np.testing.assert_allclose(q2, events.kinematics[:, 0], rtol=1e-5)
    np.testing.assert_allclose(y, events.kinematics[:, 2], rtol=1e-4, atol=1e-6)
    back_pt, back_eta = transforms.electron_from_dis(q2, y)
    np.testing.assert_allclose(back_pt, pt, rtol=1e-10)
    np.testing.assert_allclose(back_eta, eta, rtol=0, atol=1e-10)


def _no_workers(*args, **kwargs):
    raise AssertionError("the generator started its workers: the arguments were not checked first")


@pytest.mark.parametrize("call, name", [
    (lambda: eic.generate(3, q2_min=np.inf, workers=1, progress=False), "q2_min"),
    (lambda: eic.generate(2.5, workers=1, progress=False), "num_events"),
    (lambda: eic.generate(3, chunk_size=-1, workers=1, progress=False), "chunk_size"),
], ids=["eic q2_min", "eic num_events", "eic chunk_size"])
def test_generator_refuses_bad_numeric_arguments_before_starting(monkeypatch, call, name):
    monkeypatch.setattr(common, "map_chunks", _no_workers)
    with pytest.raises(ValueError, match=name):
        call()
