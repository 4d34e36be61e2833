"""The pion-shower generator (layout and physics), voxel converters and the loader."""

import dataclasses

import h5py
import numpy as np
import pytest

from fpcd.data import calo

G = calo.EPIC_FORWARD_HCAL
# The physics tests remove longitudinal leakage (twice as many layers) so they see the shower
# model, not the containment of a 6.8 lambda deep calorimeter.
DEEP = dataclasses.replace(G, num_layers=110)


@pytest.fixture(scope="module")
def showers():
    return calo.simulate(1200, seed=5)


def fixed_momentum(p, n=1500, geometry=DEEP, seed=11):
    return calo.simulate(n, momentum_range=(p, p), seed=seed, geometry=geometry, max_cells=600, return_truth=True)


def test_layout(showers):
    cells, cluster = showers.cells, showers.cluster
    assert cells.shape == (1200, 200, 5) and cluster.shape == (1200, 4)
    mask = cells[..., 4]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    num = mask.sum(axis=1)
    np.testing.assert_array_equal(num, cluster[:, 3])
    assert np.all(mask[:, :-1] >= mask[:, 1:]), "real cells first"
    energy = cells[..., 0]
    assert np.all(np.diff(energy, axis=1)[mask[:, 1:] > 0] <= 0), "most energetic first"
    np.testing.assert_allclose(energy.sum(axis=1), cluster[:, 2], rtol=1e-5)
    real = mask > 0
    assert np.all(energy[real] > G.threshold_mev * 1e-3)
    assert np.all(energy[~real] == 0) and np.all(cells[~real][:, 1:4] == 0)
    # Positions are cell centres.
    np.testing.assert_allclose(np.min(np.abs(cells[real][:, 1:2] - G.cell_centres()[None]), axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(np.min(np.abs(cells[real][:, 3:4] - G.layer_centres()[None]), axis=1), 0, atol=1e-2)
    # Conditions within the requested ranges; cells near the particle's direction (x = z tan theta).
    assert np.all((cluster[:, 0] >= 1) & (cluster[:, 0] <= 100)) and np.all((cluster[:, 1] >= 16) & (cluster[:, 1] <= 18))
    offset = cells[real][:, 1] - cells[real][:, 3] * np.tan(np.radians(np.repeat(cluster[:, 1], num.astype(int))))
    assert np.median(np.abs(offset)) < 100


def test_deterministic_per_seed_and_prefix(showers):
    again = calo.simulate(1200, seed=5)
    np.testing.assert_array_equal(again.cells, showers.cells)
    other = calo.simulate(1200, seed=6)
    assert not np.array_equal(other.cluster, showers.cluster)
    # Whole chunks of a smaller sample are the first showers of a larger one.
    np.testing.assert_array_equal(calo.simulate(calo.CHUNK, seed=5).cells, showers.cells[:calo.CHUNK])


def test_cap_keeps_most_energetic_and_records_dropped():
    full = calo.simulate(200, momentum_range=(60, 100), seed=2)
    capped = calo.simulate(200, momentum_range=(60, 100), seed=2, max_cells=12)
    np.testing.assert_array_equal(capped.cells, full.cells[:, :12])
    np.testing.assert_allclose(capped.dropped_energy, full.cells[:, 12:, 0].sum(axis=1), rtol=1e-4, atol=1e-7)
    assert np.all(capped.cluster[:, 3] <= 12) and capped.dropped_energy.max() > 0
    assert np.all(full.dropped_energy == 0)


def shower_depth_from_interaction(p):
    s, truth = fixed_momentum(p)
    energy, z = s.cells[..., 0], s.cells[..., 3]
    cog = (energy * z).sum(axis=1) / energy.sum(axis=1) - DEEP.front_z_mm - truth["first_interaction_mm"]
    # Layer of the maximum of the mean profile, counted from the first-interaction layer.
    first = np.floor(truth["first_interaction_mm"] / DEEP.layer_pitch_mm).astype(int)
    layer = np.floor((z - DEEP.front_z_mm) / DEEP.layer_pitch_mm).astype(int) - first[:, None]
    profile = np.zeros(60)
    ok = (layer >= 0) & (layer < 60) & (s.cells[..., 4] > 0)
    np.add.at(profile, layer[ok], energy[ok] / p)
    return cog.mean(), int(np.argmax(profile))


def test_longitudinal_maximum_moves_deeper_logarithmically():
    depths = [shower_depth_from_interaction(p) for p in (2.0, 8.0, 32.0)]
    cog = [d[0] for d in depths]
    steps = np.diff(cog)  # equal steps in ln E
    assert np.all(steps > 5.0), f"centre of gravity must move deeper with energy: {cog}"
    # Logarithmic: equal shifts per factor 4 in energy (a linear rise would make the second 4x the first).
    assert 0.5 < steps[1] / steps[0] < 1.6, f"shifts per factor 4 in E: {steps}"
    maxima = [d[1] for d in depths]
    assert maxima[0] <= maxima[1] <= maxima[2] and maxima[2] > maxima[0], maxima


def test_energy_linear_in_momentum_at_sampling_fraction():
    # Electrons: visible energy = sampling fraction x momentum, linear to 1 %.
    momenta = np.array([5.0, 10.0, 20.0, 40.0, 80.0])
    visible = []
    for p in momenta:
        s = calo.simulate(400, momentum_range=(p, p), seed=4, geometry=DEEP, max_cells=600, particle="electron")
        visible.append(np.mean(s.cluster[:, 2]))
    visible = np.asarray(visible)
    slope, intercept = np.polyfit(momenta, visible, 1)
    assert slope == pytest.approx(DEEP.sampling_fraction, rel=0.02)
    assert np.max(np.abs(visible - slope * momenta - intercept) / visible) < 0.01
    np.testing.assert_allclose(visible / momenta, DEEP.sampling_fraction, rtol=0.03)
    # Pions: linear up to the non-compensation of h/e = 0.7 -- the response follows the
    # documented f_samp (<f_em> + h/e (1 - <f_em>)) within 4 %, and a straight line within 4 % above 10 GeV.
    visible = []
    for p in momenta:
        s, _ = fixed_momentum(p, n=800)
        visible.append(np.mean(s.cluster[:, 2] + s.dropped_energy))
        expected = p * DEEP.mean_response(p)
        assert abs(visible[-1] / expected - 1) < 0.04, (p, visible[-1], expected)
    visible, high = np.asarray(visible), momenta >= 10
    slope, intercept = np.polyfit(momenta[high], visible[high], 1)
    assert np.max(np.abs(visible - slope * momenta - intercept)[high] / visible[high]) < 0.04
    assert DEEP.hadron_to_electron * DEEP.sampling_fraction < slope < DEEP.sampling_fraction


def test_relative_resolution_falls_like_inverse_sqrt_energy():
    momenta = np.array([2.0, 8.0, 32.0])
    # Electrons: sigma/E = em_stochastic / sqrt(E).
    for p in momenta:
        s = calo.simulate(1000, momentum_range=(p, p), seed=6, geometry=DEEP, max_cells=600, particle="electron")
        e = s.cluster[:, 2]
        assert e.std() / e.mean() == pytest.approx(DEEP.em_stochastic / np.sqrt(p), rel=0.15)
    # Pions: a / sqrt(E) (+) b with a small constant term once leakage is removed.
    resolution = []
    for p in momenta:
        s, _ = fixed_momentum(p, n=2000)
        e = s.cluster[:, 2] + s.dropped_energy
        resolution.append(e.std() / e.mean())
    resolution = np.asarray(resolution)
    (a2, b2), *_ = np.linalg.lstsq(np.stack([1 / momenta, np.ones(3)], axis=1), resolution**2, rcond=None)
    assert a2 > 0 and 0.3 < np.sqrt(a2) < 0.7, (resolution, a2, b2)
    assert b2 < 0.07**2, "the constant term must stay small without leakage"
    assert 1.6 < resolution[0] / resolution[1] < 2.3, resolution


def test_lateral_spread_widens_with_depth():
    s, truth = fixed_momentum(20.0, n=1000)
    cells = s.cells
    energy = cells[..., 0] * cells[..., 4]
    slope = np.tan(np.radians(s.cluster[:, 1]))[:, None]
    offset = cells[..., 1] - cells[..., 3] * slope  # distance from the trajectory in x
    first = truth["first_interaction_mm"][:, None]
    depth = cells[..., 3] - DEEP.front_z_mm - first  # along z from the first interaction
    widths = []
    for lo, hi in ((0, 150), (150, 400), (400, 800)):
        sel = (depth >= lo) & (depth < hi) & (energy > 0)
        w = np.where(sel, energy, 0.0)
        widths.append(np.sqrt((w * offset**2).sum() / w.sum()))
    assert widths[0] < widths[1] < widths[2], widths


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="momentum_range"):
        calo.simulate(10, momentum_range=(0, 10))
    with pytest.raises(ValueError, match="theta_range"):
        calo.simulate(10, theta_range=(20, 10))
    with pytest.raises(ValueError, match="spectrum"):
        calo.simulate(10, spectrum="flat")
    with pytest.raises(ValueError, match="particle"):
        calo.simulate(10, particle="kaon")


# --- voxels -------------------------------------------------------------------------------------


def test_to_voxels_sums_cells_into_the_right_voxel(showers):
    images = calo.to_voxels(showers.cells)
    assert images.shape == (1200, 11, 11, 11)
    np.testing.assert_allclose(images.sum(axis=(1, 2, 3)), showers.cluster[:, 2], rtol=1e-5)
    # One hand-placed cell: layer 12 -> voxel 2, x cell 40 -> voxel 8, y cell 3 -> voxel 0.
    cell = np.zeros((1, 2, 5), np.float32)
    cell[0, 0] = [0.7, G.cell_centres()[40], G.cell_centres()[3], G.layer_centres()[12], 1.0]
    cell[0, 1] = [9.0, 0.0, 0.0, G.layer_centres()[0], 0.0]  # padding is ignored
    image = calo.to_voxels(cell)
    assert image[0, 2, 8, 0] == pytest.approx(0.7) and image.sum() == pytest.approx(0.7)


def test_from_voxels_round_trip(showers):
    images = calo.to_voxels(showers.cells[:200])
    points = calo.from_voxels(images)
    np.testing.assert_allclose(calo.to_voxels(points), images, rtol=1e-6)
    np.testing.assert_array_equal(points[..., 4].sum(axis=1), (images > 0).sum(axis=(1, 2, 3)))
    z, x, _ = calo.voxel_centres()
    real = points[..., 4] > 0
    np.testing.assert_allclose(np.min(np.abs(points[real][:, 3:4] - z[None]), axis=1), 0, atol=1e-2)
    np.testing.assert_allclose(np.min(np.abs(points[real][:, 1:2] - x[None]), axis=1), 0, atol=1e-2)
    assert np.all(np.diff(points[..., 0], axis=1)[real[:, 1:]] <= 0)
    with pytest.raises(ValueError, match="group"):
        calo.to_voxels(showers.cells[:2], group=4)


# --- files --------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, showers):
    path = calo.save(showers.take(slice(0, 50)), str(tmp_path / "pions.h5"))
    loaded = calo.load(path)
    np.testing.assert_array_equal(loaded.cells, showers.cells[:50])
    np.testing.assert_array_equal(loaded.cluster, showers.cluster[:50])


def test_load_calochallenge_layout(tmp_path):
    path = str(tmp_path / "cc.h5")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["incident_energies"] = rng.uniform(1e3, 1e6, (20, 1))
        f["showers"] = rng.random((20, 45 * 16 * 9))
    data = calo.load(path)
    assert isinstance(data, calo.CaloChallengeSet) and len(data) == 20
    assert data.grid(45, 16, 9).shape == (20, 45, 16, 9)


def write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return str(path)


@pytest.mark.parametrize("datasets, message", [
    ({"hcal_cells": np.zeros((4, 10, 5))}, "missing dataset 'cluster'"),
    ({"hcal_cells": np.zeros((4, 10, 4)), "cluster": np.zeros((4, 4))}, "expected 3-d with last axis 5"),
    ({"hcal_cells": np.zeros((4, 10, 5)), "cluster": np.zeros((3, 4))}, "4 showers but cluster has 3"),
    ({"hcal_cells": np.full((4, 10, 5), np.nan), "cluster": np.zeros((4, 4))}, "NaN"),
    ({"hcal_cells": np.full((4, 10, 5), 0.5), "cluster": np.zeros((4, 4))}, "mask column"),
    ({"incident_energies": np.ones((4, 1))}, "missing dataset 'showers'"),
    ({"images": np.zeros((4, 3))}, "unknown layout"),
])
def test_load_errors_name_file_and_problem(tmp_path, datasets, message):
    path = write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(calo.CaloDataError, match=message) as info:
        calo.load(path)
    assert "bad.h5" in str(info.value)


def test_load_missing_and_unreadable(tmp_path):
    with pytest.raises(calo.CaloDataError, match="no such file"):
        calo.load(str(tmp_path / "absent.h5"))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(calo.CaloDataError, match="not a readable hdf5"):
        calo.load(str(tmp_path / "text.h5"))


# --- physically invalid files and arguments ---------------------------------------------------


def small_showers(n=4, c=6):
    cells = np.zeros((n, c, 5), np.float32)
    counts = np.array([3, 1, 6, 2])[:n]
    for i, k in enumerate(counts):
        cells[i, :k] = [0.5, 50.0, -50.0, 3900.0, 1.0]
    cluster = np.stack([np.full(n, 10.0), np.full(n, 17.0), cells[..., 0].sum(1), counts], 1).astype(np.float32)
    return cells, cluster


CALO_CASES = [
    ("momentum_zero", r"dataset 'cluster': the generated momentum P_gen \(column 0\) is not positive in 1 row\(s\) "
                      r"\(first: row 2, value 0\)"),
    ("momentum_negative", r"P_gen \(column 0\) is not positive in 1 row\(s\) \(first: row 1, value -3\)"),
    ("n_cells", r"dataset 'cluster': N_cells \(column 3\) differs .* \(first: row 3, N_cells 5 but 2 real cells\)"),
    ("dropped_length", r"dataset 'dropped_energy' has 3 rows but hcal_cells has 4"),
    ("dropped_negative", r"dataset 'dropped_energy': negative energy in 1 row\(s\) \(first: row 0"),
]


@pytest.mark.parametrize("case, message", CALO_CASES, ids=[case for case, _ in CALO_CASES])
def test_calo_loader_refuses_invalid_point_clouds(tmp_path, case, message):
    cells, cluster = small_showers()
    extra = {}
    if case == "momentum_zero":
        cluster[2, 0] = 0.0
    elif case == "momentum_negative":
        cluster[1, 0] = -3.0
    elif case == "n_cells":
        cluster[3, 3] = 5
    elif case == "dropped_length":
        extra["dropped_energy"] = np.zeros(3, np.float32)
    elif case == "dropped_negative":
        extra["dropped_energy"] = np.array([-1.0, 0, 0, 0], np.float32)
    path = write(tmp_path / "bad.h5", hcal_cells=cells, cluster=cluster, **extra)
    with pytest.raises(calo.CaloDataError, match=message) as info:
        calo.load(path)
    assert str(info.value).startswith(path)


def test_calo_loader_still_reads_a_valid_point_cloud(tmp_path):
    cells, cluster = small_showers()
    loaded = calo.load(write(tmp_path / "good.h5", hcal_cells=cells, cluster=cluster))
    np.testing.assert_array_equal(loaded.cluster, cluster)


CALOCHALLENGE_CASES = [
    ("incident_zero", r"dataset 'incident_energies': the incident energy is not positive .* \(first: row 1, value 0\)"),
    ("voxel_negative", r"dataset 'showers': negative voxel energies in 1 row\(s\) \(first: row 2\)"),
]


@pytest.mark.parametrize("case, message", CALOCHALLENGE_CASES, ids=[case for case, _ in CALOCHALLENGE_CASES])
def test_calo_loader_refuses_invalid_calochallenge_files(tmp_path, case, message):
    energies, voxels = np.full((3, 1), 1e4), np.ones((3, 12))
    if case == "incident_zero":
        energies[1] = 0.0
    else:
        voxels[2, 5] = -1.0
    path = write(tmp_path / "cc.h5", incident_energies=energies, showers=voxels)
    with pytest.raises(calo.CaloDataError, match=message) as info:
        calo.load(path)
    assert path in str(info.value)


def test_simulate_refuses_an_infinite_momentum_range():
    # An infinite bound would give showers of infinite momentum.
    with pytest.raises(ValueError, match=r"momentum_range=\(1.0, inf\): need finite"):
        calo.simulate(4, momentum_range=(1.0, np.inf))


@pytest.mark.parametrize("num_showers, kwargs, name", [
    (4, {"phi": np.inf}, "phi"),
    (4.5, {}, "num_showers"),
    (4, {"max_cells": 2.5}, "max_cells"),
])
def test_simulate_refuses_other_bad_numeric_arguments(num_showers, kwargs, name):
    with pytest.raises(ValueError, match=name):
        calo.simulate(num_showers, **kwargs)



def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("cells", [np.zeros((3, 5)), np.zeros((2, 3, 4)), np.zeros((2, 3, 5, 1))],
                         ids=["2-d", "4 features", "4-d"])
def test_to_voxels_names_the_expected_shape(cells):
    with pytest.raises(ValueError, match=rf"cells must have shape \(N, C, 5\).*got shape {re_shape(cells.shape)}"):
        calo.to_voxels(cells)


def test_from_voxels_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"images must have shape \(N, 11, 11, 11\).*got shape \(2, 11, 11\)"):
        calo.from_voxels(np.zeros((2, 11, 11)))
