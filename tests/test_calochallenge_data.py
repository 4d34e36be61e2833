"""CaloChallenge 2022 geometry and files (fpcd.data.calochallenge): the binning read from the
challenge's XML against the datasets' published voxel counts, the flattening order, the file
layout written and read back, and bad files named in one line."""

import filecmp
import os

import h5py
import numpy as np
import pytest

from fpcd.data import calochallenge
from fpcd.data.calo import CaloChallengeSet
from fpcd.data.calochallenge import CaloChallengeError, dataset_geometry, load, read_binning, save

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "calochallenge")


@pytest.mark.parametrize("dataset, layers, voxels, pid", [
    ("1_photons", 24, 368, 22), ("1_pions", 24, 533, 211), ("2", 45, 6480, 11), ("3", 45, 40500, 11)])
def test_the_binning_gives_each_datasets_published_voxel_count(dataset, layers, voxels, pid):
    geometry = dataset_geometry(dataset)
    assert (geometry.num_layers, geometry.num_voxels, geometry.pid) == (layers, voxels, pid)
    assert sum(s.stop - s.start for s in geometry.layer_slices()) == voxels


def test_dataset_2_is_45_layers_of_16_angular_by_9_radial_bins_radial_fastest():
    geometry = dataset_geometry("2")
    assert {(layer.num_alpha, layer.num_radial) for layer in geometry.layers} == {(16, 9)}
    index = geometry.voxel_indices()
    flat = np.arange(geometry.num_voxels)
    np.testing.assert_array_equal(index["layer"], flat // 144)
    np.testing.assert_array_equal(index["alpha"], (flat % 144) // 9)
    np.testing.assert_array_equal(index["radial"], flat % 9)
    grid = CaloChallengeSet(np.ones(1), flat[None].astype(float)).grid(45, 16, 9)  # the loader's own reshape agrees
    assert grid[0, 3, 5, 7] == flat[(index["layer"] == 3) & (index["alpha"] == 5) & (index["radial"] == 7)][0]
    centres = geometry.voxel_centres()
    assert centres["r"][0] == pytest.approx(2.325) and centres["r"][8] == pytest.approx(0.5 * (37.2 + 41.85))
    assert centres["alpha"][0] == pytest.approx(-np.pi + np.pi / 16) and np.all(np.abs(centres["alpha"]) < np.pi)


def test_layers_without_voxels_and_per_layer_binning_of_dataset_1():
    pions = dataset_geometry("1_pions")
    assert [layer.num_voxels for layer in pions.layers[:5]] == [8, 100, 100, 5, 0]
    showers = np.arange(2 * pions.num_voxels, dtype=float).reshape(2, -1)
    per_layer = pions.layer_energies(showers)
    assert per_layer.shape == (2, 24) and per_layer[0, 4] == 0.0
    np.testing.assert_allclose(per_layer.sum(axis=1), showers.sum(axis=1))
    assert per_layer[0, 0] == sum(range(8))


def test_the_projects_copies_are_the_published_files():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/calochallenge is not beside this checkout")
    for filename, _ in calochallenge.DATASETS.values():
        assert filecmp.cmp(os.path.join(SHARED, filename), os.path.join(calochallenge.BINNING_DIR, filename),
                           shallow=False), filename


def test_a_file_written_is_the_challenges_layout_and_reads_back(tmp_path):
    geometry = dataset_geometry("2")
    rng = np.random.default_rng(0)
    data = CaloChallengeSet(rng.uniform(1e3, 1e6, 5), rng.exponential(1.0, (5, geometry.num_voxels)))
    path = save(data, str(tmp_path / "gen.h5"))
    with h5py.File(path) as f:
        assert sorted(f) == ["incident_energies", "showers"]
        assert f["incident_energies"].shape == (5, 1) and f["showers"].shape == (5, 6480)
        assert f["incident_energies"].dtype == np.float32 and f["showers"].dtype == np.float32
    back = load(path, geometry)
    np.testing.assert_array_equal(back.showers, data.showers.astype(np.float32))
    np.testing.assert_array_equal(back.incident_energies, data.incident_energies.astype(np.float32))


def test_a_file_of_another_dataset_is_named(tmp_path):
    data = CaloChallengeSet(np.full(2, 1e4), np.zeros((2, 533)))
    path = save(data, str(tmp_path / "pions.h5"))
    with pytest.raises(CaloChallengeError, match=r"533 voxels \(the voxel count of dataset 1_pions\), but "
                                                 r"dataset 2's binning \(electron\) has 6480 \(45 layers\)"):
        load(path, dataset_geometry("2"))
    with pytest.raises(CaloChallengeError, match="unknown CaloChallenge dataset '4'"):
        dataset_geometry("4")


@pytest.mark.parametrize("text, match", [
    ("<Bins></Bins>", "no <Bin> element"),
    ("<Bins><Bin pid='11' name='e'><Layer id='0' r_edges='0,2,1' n_bin_alpha='4'/></Bin></Bins>",
     "r_edges must start at 0 and increase strictly"),
    ("<Bins><Bin pid='11' name='e'><Layer id='0' r_edges='0,1' n_bin_alpha='0'/></Bin></Bins>",
     "n_bin_alpha must be at least 1"),
    ("<Bins><Bin pid='11' name='e'><Layer id='1' r_edges='0,1' n_bin_alpha='2'/></Bin></Bins>",
     "layers with ids 0, 1, 2"),
    ("<Bins><Bin pid='11' name='e'><Layer id='0' r_edges='0,1'", "cannot read the binning file"),
])
def test_a_bad_binning_file_is_named(tmp_path, text, match):
    path = tmp_path / "binning.xml"
    path.write_text(text)
    with pytest.raises(CaloChallengeError, match=match):
        read_binning(str(path))
    with pytest.raises(CaloChallengeError, match=str(path)):
        read_binning(str(path))


# --- the built-in electron showers in the dataset-2 readout --------------------------------------------------

def _shower_moments(showers, energy_mev):
    geometry = dataset_geometry("2")
    s = np.asarray(showers, np.float64)
    total = s.sum(axis=1)
    depth = (geometry.layer_energies(s) * (np.arange(45) + 0.5)).sum(axis=1) / total  # in voxel layers
    x0_per_layer = calochallenge.SILICON_TUNGSTEN.layer_pitch_mm / calochallenge.SILICON_TUNGSTEN.x0_mm
    return total / energy_mev, depth * x0_per_layer


@pytest.mark.parametrize("energy_gev, t_cog", [(1.0, 6.1), (10.0, 8.3), (100.0, 10.6)])
def test_simulated_showers_follow_gflash_in_depth_and_resolution(energy_gev, t_cog):
    """The centre of gravity in X0 is GFLASH's for tungsten (../shared/physics/calo.md (b): 6.1, 8.3,
    10.6 X0; measured 6.01, 8.23, 10.52 on 1,000 showers each), E_tot/E_inc is the contained
    fraction (measured 0.986-0.990) with the 17 %/sqrt(E) sampling term (measured 0.168-0.176 x
    sqrt(E/GeV)). Depths in mm instead of X0, or no sampling fluctuations, fail."""
    energy = energy_gev * 1e3
    data = calochallenge.simulate(400, energy_range_mev=(energy, energy), seed=3)
    ratio, depth = _shower_moments(data.showers, energy)
    assert abs(depth.mean() - t_cog) < 0.3, depth.mean()
    assert 0.975 < ratio.mean() < 0.995, ratio.mean()
    if energy_gev <= 10:  # above, the relative spread is no longer the sampling term's alone
        assert ratio.std() * np.sqrt(energy_gev) == pytest.approx(0.17, abs=0.025)


def test_simulated_showers_are_the_challenges_layout(tmp_path):
    data = calochallenge.simulate(300, seed=5, chunk_size=128)
    assert data.showers.shape == (300, 6480) and data.showers.dtype == np.float32
    assert np.all(data.showers >= 0) and np.all((data.showers == 0) | (data.showers >= 0.01515))
    # The threshold is where hits stop (measured: smallest hit 0.015155 MeV), every shower is a
    # shower (measured: at least 144 hit voxels, E_tot / E_inc 0.72-1.35 down to 1 GeV).
    assert data.showers[data.showers > 0].min() < 0.0153
    assert (data.showers > 0).sum(axis=1).min() >= 100
    ratio = data.showers.sum(axis=1) / data.incident_energies
    assert ratio.min() > 0.6 and ratio.max() < 1.5
    log_e = np.log(data.incident_energies)
    assert data.incident_energies.min() >= 1e3 and data.incident_energies.max() <= 1e6
    assert abs(log_e.mean() - 0.5 * np.log(1e9)) < 0.3  # log-uniform: the mean of ln E is mid-range
    again = calochallenge.simulate(300, seed=5, chunk_size=128)
    np.testing.assert_array_equal(again.showers, data.showers)
    other = calochallenge.simulate(300, seed=6, chunk_size=128)
    assert not np.array_equal(other.showers, data.showers)
    back = load(save(data, str(tmp_path / "ds2.h5")), dataset_geometry("2"))
    np.testing.assert_array_equal(back.showers, data.showers)
    with pytest.raises(ValueError, match="the built-in electron showers fill dataset 2 or 3"):
        calochallenge.simulate(3, dataset="1_pions")
    with pytest.raises(ValueError, match="energy_range_mev"):
        calochallenge.simulate(3, energy_range_mev=(0.0, 1e3))
