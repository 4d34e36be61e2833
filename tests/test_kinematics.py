"""Collider kinematics shared by the jet and EIC data (fpcd.data.kinematics)."""

import numpy as np

from fpcd.data import kinematics


def test_wrap_phi_lands_in_the_half_open_interval():
    phi = np.array([-3 * np.pi, -np.pi, 0.0, np.pi, 1.5 * np.pi, 7.0])
    wrapped = kinematics.wrap_phi(phi)
    assert np.all((wrapped > -np.pi) & (wrapped <= np.pi))
    np.testing.assert_allclose(np.cos(wrapped), np.cos(phi), atol=1e-12)
    np.testing.assert_allclose(np.sin(wrapped), np.sin(phi), atol=1e-12)


def test_pt_eta_phi_mass_of_a_known_four_vector():
    pt, eta, phi, mass = kinematics.pt_eta_phi_mass(np.array([3.0]), np.array([4.0]), np.array([0.0]),
                                                   np.array([13.0]))
    np.testing.assert_allclose([pt[0], eta[0], phi[0], mass[0]], [5.0, 0.0, np.arctan2(4, 3), 12.0])


def test_boost_inverts_and_energies_are_on_shell():
    e, pz = kinematics.energies(2.0, 0.7, 0.5), 2.0 * np.sinh(0.7)
    back = kinematics.boost_z(*kinematics.boost_z(e, pz, 0.3), -0.3)
    np.testing.assert_allclose(back, (e, pz), rtol=1e-12)
    np.testing.assert_allclose(e**2 - pz**2 - 2.0**2, 0.25, rtol=1e-12)
