"""Collider kinematics shared by the jet and EIC data: azimuth wrapping, (pT, eta, phi, m) of
four-vectors, energies and boosts along the beam axis."""

from __future__ import annotations

import numpy as np


def wrap_phi(phi):
    """Wrap angles to (-pi, pi]."""
    return np.pi - np.mod(np.pi - phi, 2.0 * np.pi)


def pt_eta_phi_mass(px, py, pz, e):
    """``(pT, eta, phi, mass)`` of four-vectors (numpy arrays, GeV)."""
    pt = np.hypot(px, py)
    p = np.sqrt(pt**2 + pz**2)
    eta = np.arcsinh(np.divide(pz, pt, out=np.zeros_like(pz), where=pt > 0))
    phi = np.arctan2(py, px)
    mass = np.sqrt(np.maximum(e**2 - p**2, 0.0))
    return pt, eta, phi, mass


def energies(pt, eta, mass):
    """Energies [GeV] of particles of transverse momentum ``pt``, pseudorapidity ``eta`` and ``mass``."""
    return np.sqrt(np.asarray(mass, np.float64) ** 2 + (np.asarray(pt, np.float64) * np.cosh(eta)) ** 2)


def boost_z(e, pz, beta):
    """``(E', pz')`` of four-vectors seen from a frame moving with ``beta`` along +z."""
    gamma = 1.0 / np.sqrt(1.0 - beta**2)
    return gamma * (e - beta * pz), gamma * (pz - beta * e)
