"""The CaloChallenge high-level features and separation power (fpcd.metrics.calochallenge) against
their definitions on showers whose answers are known exactly."""

import numpy as np
import pytest

from fpcd.data.calochallenge import dataset_geometry
from fpcd.metrics.calochallenge import high_level_features, separation_power


def test_a_one_voxel_layer_has_its_voxels_centre_and_no_width():
    geometry = dataset_geometry("2")
    showers = np.zeros((1, geometry.num_voxels))
    index = geometry.voxel_indices()
    voxel = np.flatnonzero((index["layer"] == 7) & (index["alpha"] == 3) & (index["radial"] == 4))[0]
    showers[0, voxel] = 250.0
    features = high_level_features(showers, [1000.0], geometry)
    r, alpha = 0.5 * (18.6 + 23.25), -np.pi + 3.5 * 2 * np.pi / 16
    assert features["E_ratio"][0] == pytest.approx(0.25)
    assert features["E_layer_7"][0] == 250.0 and features["E_layer_6"][0] == 0.0
    assert features["EC_eta_7"][0] == pytest.approx(r * np.cos(alpha))
    assert features["EC_phi_7"][0] == pytest.approx(r * np.sin(alpha))
    assert features["width_eta_7"][0] == pytest.approx(0.0, abs=1e-6)
    assert features["EC_eta_6"][0] == 0.0 and features["width_phi_6"][0] == 0.0  # an empty layer
    assert len(features) == 1 + 45 * 5


def test_two_opposite_voxels_centre_at_zero_with_the_spread_as_width():
    """Equal energy at alpha and alpha + pi (same radius): centre 0, width |r cos(alpha)| in eta."""
    geometry = dataset_geometry("2")
    index = geometry.voxel_indices()
    showers = np.zeros((1, geometry.num_voxels))
    for a in (2, 10):  # bins 8 apart of 16: opposite
        showers[0, np.flatnonzero((index["layer"] == 0) & (index["alpha"] == a) & (index["radial"] == 1))[0]] = 5.0
    features = high_level_features(showers, [100.0], geometry)
    r, alpha = 0.5 * (4.65 + 9.3), -np.pi + 2.5 * 2 * np.pi / 16
    assert features["EC_eta_0"][0] == pytest.approx(0.0, abs=1e-9)
    assert features["width_eta_0"][0] == pytest.approx(abs(r * np.cos(alpha)), rel=1e-9)
    assert features["width_phi_0"][0] == pytest.approx(abs(r * np.sin(alpha)), rel=1e-9)


def test_layers_of_one_angular_bin_get_energies_but_no_centres():
    """Dataset 1 pions: layer 0 (one angular bin) has an energy feature and no centre; layer 4 has
    no voxels and no feature."""
    geometry = dataset_geometry("1_pions")
    showers = np.random.default_rng(0).exponential(1.0, (3, geometry.num_voxels))
    features = high_level_features(showers, np.full(3, 1e3), geometry)
    assert "E_layer_0" in features and "EC_eta_0" not in features and "E_layer_4" not in features
    assert "EC_eta_1" in features and "EC_phi_13" in features
    total = sum(v for k, v in features.items() if k.startswith("E_layer_"))
    np.testing.assert_allclose(total, showers.sum(axis=1))
    with pytest.raises(ValueError, match=r"need showers \(N, 533\)"):
        high_level_features(showers[:, :10], np.ones(3), geometry)


def test_separation_power_is_zero_for_equal_and_one_for_disjoint_histograms():
    bins = np.linspace(0.0, 1.0, 11)
    x = np.random.default_rng(1).uniform(0.0, 1.0, 5000)
    assert separation_power(x, x, bins) == 0.0
    assert separation_power(x * 0.5, x * 0.5 + 0.5, bins) == pytest.approx(1.0, abs=1e-3)
    # Half of the mass in a bin the other lacks, on each side: 1/2 (0.5^2 / 0.5 + 0.5^2 / 0.5) = 0.5.
    a = np.repeat([0.05, 0.15], 100)
    b = np.repeat([0.05, 0.95], 100)
    assert separation_power(a, b, bins) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:Recommended number of jets")  # small samples on purpose
def test_the_high_level_vector_and_its_physics_distances():
    """The vector has the challenge's columns (1 + 45 layer energies + 4 x 45 centres and widths for
    dataset 2); FPD and KPD of two samples of the same simulated showers are near zero and grow
    beyond their errors when the generated showers lose half their energy (measured: FPD 0.0019 +-
    0.0026 -> 0.043, KPD -0.0007 +- 0.0086 -> 0.037)."""
    from fpcd.data import calochallenge
    from fpcd.metrics.calochallenge import high_level_vector, physics_distances

    geometry = dataset_geometry("2")
    data = calochallenge.simulate(1200, seed=7)
    vectors = []
    for rows, scale in ((slice(0, 600), 1.0), (slice(600, 1200), 1.0), (slice(600, 1200), 0.5)):
        showers, energies = data.showers[rows] * scale, data.incident_energies[rows]
        vectors.append(high_level_vector(high_level_features(showers, energies, geometry), energies))
    assert vectors[0].shape == (600, 1 + 45 + 4 * 45)
    np.testing.assert_allclose(vectors[0][:, 0], np.log10(data.incident_energies[:600]), rtol=1e-6)
    # On E_inc and the energies of layers 0-11 (the full 226 columns need the challenge's 50k
    # showers: at 600 the covariances are singular and FPD's small-sample bias dominates).
    options = {"min_samples": 200, "max_samples": 600, "kpd_batch_size": 300}
    same = physics_distances(vectors[0][:, :13], vectors[1][:, :13], **options)
    shifted = physics_distances(vectors[0][:, :13], vectors[2][:, :13], **options)
    assert shifted["fpd"] > 5 * (same["fpd"] + same["fpd_error"])
    assert abs(same["kpd"]) < same["kpd_error"] and shifted["kpd"] > 3 * same["kpd_error"]
