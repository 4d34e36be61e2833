"""The calorimeter description and the shower physics of the generator (fpcd.data.calo_physics)."""

import dataclasses

import numpy as np
import pytest

from fpcd.data import calo_physics

G = calo_physics.EPIC_FORWARD_HCAL


def test_gflash_part_reproduces_the_notes_tungsten_numbers():
    """The electromagnetic component against the GFLASH sanity numbers of ../shared/physics/calo.md
    (an independent implementation, tungsten, 2000 showers each)."""
    tungsten = dataclasses.replace(G, absorber_z=74.0, absorber_a=183.84, absorber_x0_gcm2=6.76, em_spots=2000)
    assert tungsten.critical_energy_mev == pytest.approx(8.0, abs=0.05)
    rng = np.random.default_rng(0)
    for energy, (t_max, alpha, t_cog) in ((1.0, (4.1, 3.3, 6.1)), (10.0, (6.4, 4.4, 8.3)), (100.0, (8.6, 5.5, 10.6))):
        t, a, _ = calo_physics._gflash_parameters(rng, np.full(2000, energy), tungsten)
        assert t.mean() == pytest.approx(t_max, abs=0.15)
        assert a.mean() == pytest.approx(alpha, abs=0.15)
        assert (a * t / (a - 1)).mean() == pytest.approx(t_cog, abs=0.25)
    _, radius, _ = calo_physics.em_spots(rng, np.full(200, 10.0), tungsten)
    contained = [np.mean(radius < k * tungsten.moliere_mm) for k in (1.0, 1.5, 3.5)]
    np.testing.assert_allclose(contained, [0.89, 0.94, 0.985], atol=0.01)
