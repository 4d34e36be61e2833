"""Shower observables, their W1, the ROC AUC and the classifier."""

import itertools

import numpy as np
import pytest

from fpcd.data.calo import EPIC_FORWARD_HCAL as G
from fpcd.metrics import calo as m


def two_cell_shower():
    cells = np.zeros((1, 4, 5))
    cells[0, 0] = [3.0, 0.0, 0.0, G.layer_centres()[0], 1]
    cells[0, 1] = [1.0, 400.0, 0.0, G.layer_centres()[7], 1]
    cells[0, 2] = [50.0, 999.0, 999.0, G.layer_centres()[9], 0]  # padding
    return cells


def test_observables_of_a_hand_built_shower():
    obs = m.shower_observables(two_cell_shower(), np.array([100.0]))
    assert obs["energy_over_momentum"][0] == pytest.approx(0.04)
    assert obs["num_cells"][0] == 2
    assert obs["centroid_x"][0] == pytest.approx(100.0)
    assert obs["width_x"][0] == pytest.approx(np.sqrt(0.75 * 100**2 + 0.25 * 300**2))
    assert obs["centroid_y"][0] == 0 and obs["width_y"][0] == 0
    z0, z7 = G.layer_centres()[[0, 7]]
    assert obs["centroid_z"][0] == pytest.approx(0.75 * z0 + 0.25 * z7)
    layers = obs["energy_per_layer"][0]
    assert layers.shape == (55,) and layers[0] == 3.0 and layers[7] == 1.0 and layers.sum() == 4.0
    # Distances from the centroid: 100 mm (bin 75-150) and 300 mm (bin 250-400).
    np.testing.assert_allclose(obs["radial_profile"][0], [0, 0.75, 0, 0.25, 0, 0])
    grouped = m.shower_observables(two_cell_shower(), np.array([100.0]), group=5)["energy_per_layer"][0]
    np.testing.assert_allclose(grouped, [3.0, 1.0] + [0.0] * 9)


def test_observable_w1():
    rng = np.random.default_rng(0)
    a = {"s": rng.normal(size=500), "v": rng.normal(size=(500, 3))}
    assert all(v == 0 for v in m.observable_w1(a, a).values())
    shifted = {"s": a["s"] + 0.5, "v": a["v"] + np.array([0.0, 0.3, 0.6])}
    w1 = m.observable_w1(a, shifted)
    assert w1["s"] == pytest.approx(0.5) and w1["v"] == pytest.approx(0.3)


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(1)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.normal(size=60) + labels, 1)  # ties included
    pos, neg = scores[labels], scores[~labels]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert m.roc_auc(labels, scores) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError):
        m.roc_auc(np.ones(3), [1, 2, 3])


def test_classifier_auc_detects_a_difference_and_not_a_non_difference():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8))
    same = m.classifier_auc(a, b, seed=0, hidden=(64, 64), epochs=20)
    assert abs(same["auc"] - 0.5) < 0.06
    c = b.copy()
    c[:, 3] += 1.5  # optimal AUC Phi(1.5 / sqrt 2) = 0.856
    different = m.classifier_auc(a, c, seed=0, hidden=(64, 64), epochs=20)
    assert 0.78 < different["auc"] < 0.9
    assert different["jsd"] > same["jsd"]


def test_feature_builders_shapes():
    cells = np.repeat(two_cell_shower(), 3, axis=0)
    momentum, theta = np.full(3, 100.0), np.full(3, 17.0)
    obs = m.shower_observables(cells, momentum)
    features = m.high_level_features(obs, momentum, theta)
    assert features.shape == (3, 2 + 55 + 6 + 6 + 2) and np.isfinite(features).all()
    images = np.zeros((3, 11, 11, 11))
    assert m.voxel_features(images, momentum).shape == (3, 1 + 1331)


def test_separating_features_rank_columns_by_their_own_auc():
    """Hand-made samples: column b separates completely (generated higher: AUC 1), column c partly
    (generated lower more often: AUC 7/16 by counting pairs), column a not at all (0.5)."""
    truth = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 3.0], [2.0, 2.0, 5.0], [3.0, 3.0, 7.0]])
    generated = np.array([[0.0, 10.0, 0.0], [1.0, 11.0, 2.0], [2.0, 12.0, 4.0], [3.0, 13.0, 8.0]])
    ranked = m.separating_features(truth, generated, ["a", "b", "c"], top=3)
    assert [r["feature"] for r in ranked] == ["b", "c", "a"]
    # column c: generated 0 < all truth, 2 > 1, 4 > 1 and 3, 8 > all: 0 + 1 + 2 + 4 = 7 wins of 16.
    np.testing.assert_allclose([r["auc"] for r in ranked], [1.0, 7 / 16, 0.5])
    rng = np.random.default_rng(0)
    cells = np.zeros((3, 4, 5))
    cells[..., 0] = rng.uniform(0.01, 1.0, (3, 4))
    cells[..., 1:3] = rng.normal(0.0, 100.0, (3, 4, 2))
    cells[..., 3] = G.front_z_mm + rng.uniform(0, G.num_layers * G.layer_pitch_mm, (3, 4))
    cells[..., 4] = 1.0
    features = m.high_level_features(m.shower_observables(cells, np.ones(3)), np.ones(3), np.full(3, 17.0))
    observables = m.shower_observables(cells, np.ones(3))
    names = m.high_level_feature_names(G.num_layers)
    assert features.shape[1] == len(names)
    column = {name: features[:, i] for i, name in enumerate(names)}  # each name labels its own column
    for k in ("centroid", "width"):
        for a in "xyz":
            np.testing.assert_allclose(column[f"{k}_{a}"], observables[f"{k}_{a}"] / 100.0, rtol=1e-5)
    np.testing.assert_allclose(column["num_cells"], observables["num_cells"])
    np.testing.assert_allclose(column["log10 E layer 7"], np.log10(observables["energy_per_layer"][:, 7] + 1e-8),
                               rtol=1e-5)
    np.testing.assert_allclose(column["radial fraction 150-250 mm"], observables["radial_profile"][:, 2], rtol=1e-5)
    with pytest.raises(ValueError, match="3 names for 2 feature columns"):
        m.separating_features(truth[:, :2], generated[:, :2], ["a", "b", "c"])
