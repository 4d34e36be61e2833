"""Hit voxels as point clouds and back (fpcd.data.calochallenge_transforms): the exact round trip,
collisions moved to free neighbours with the count kept, the periodic angle, and dataset 1 refused."""

import numpy as np
import pytest

from fpcd.data import calochallenge
from fpcd.data.calochallenge import dataset_geometry
from fpcd.data.calochallenge_transforms import grid_shape, voxel_points, voxels_from_points


@pytest.fixture(scope="module")
def showers():
    return calochallenge.simulate(40, seed=11).showers


def test_points_round_trip_to_the_same_showers(showers):
    geometry = dataset_geometry("2")
    noise = np.random.default_rng(0).random((len(showers), 6480, 3))
    points, mask, counts = voxel_points(showers, geometry, noise, dequantisation=0.9)
    np.testing.assert_array_equal(counts, (showers > 0).sum(axis=1))
    np.testing.assert_array_equal(mask.sum(axis=1), counts)
    for row, count in zip(points, counts):  # most energetic first
        assert np.all(np.diff(row[:count, 0]) <= 0)
    back = voxels_from_points(points, mask, geometry)
    np.testing.assert_allclose(back, showers, rtol=2e-6)
    assert grid_shape(geometry) == (45, 16, 9)


def test_a_collision_moves_to_a_free_neighbour_and_keeps_the_count():
    geometry = dataset_geometry("2")
    # Two points of one shower round to voxel (layer 3, alpha 5, radial 2); the weaker, sitting
    # towards radial 3, moves there.
    points = np.array([[[np.log10(50.0), 3.0, 5.0, 2.1], [np.log10(5.0), 3.0, 5.0, 2.3]]], np.float32)
    mask = np.ones((1, 2), np.float32)
    back = voxels_from_points(points, mask, geometry)
    flat = lambda layer, alpha, radial: (layer * 16 + alpha) * 9 + radial  # noqa: E731
    assert back[0, flat(3, 5, 2)] == pytest.approx(50.0) and back[0, flat(3, 5, 3)] == pytest.approx(5.0)
    assert (back > 0).sum() == 2
    merged = voxels_from_points(points, mask, geometry, resolve_collisions=False)
    assert (merged > 0).sum() == 1 and merged[0, flat(3, 5, 2)] == pytest.approx(55.0)
    scaled = voxels_from_points(points, mask, geometry, total_energy=[110.0])
    assert scaled.sum() == pytest.approx(110.0)


def test_the_angle_wraps_around():
    geometry = dataset_geometry("2")
    flat = lambda layer, alpha, radial: (layer * 16 + alpha) * 9 + radial  # noqa: E731
    points = np.array([[[1.0, 0.0, 15.6, 0.0], [0.5, 0.0, -0.3, 0.0], [0.2, 0.0, 0.1, 0.0]]], np.float32)
    back = voxels_from_points(points, np.ones((1, 3)), geometry)
    # 15.6 and -0.3 both round to alpha 0 (16 = 0); the weaker moves to alpha 15, the nearest free
    # voxel across the wrap; the third, at 0.1, finds 0 and 15 taken and moves to alpha 1.
    assert back[0, flat(0, 0, 0)] == pytest.approx(10.0)
    assert back[0, flat(0, 15, 0)] == pytest.approx(10**0.5)
    assert (back > 0).sum() == 3


def test_dataset_1_has_no_common_grid():
    with pytest.raises(ValueError, match="voxel point clouds need one binning in every layer"):
        grid_shape(dataset_geometry("1_pions"))
