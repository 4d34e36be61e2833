"""The ePIC-like forward hadronic calorimeter (:class:`CaloGeometry`) and the parametrised
charged-pion shower physics that :func:`fpcd.data.calo.simulate` draws from it (see
:class:`CaloGeometry` for every constant and where it comes from):

* The pion travels from the origin as a minimum-ionising particle (a MIP signal in every layer it
  crosses) to its first nuclear interaction, exponentially distributed with the pion interaction
  length ``1.2 lambda_I``.
* There a fraction ``f_em`` of its kinetic energy E goes into an electromagnetic component and the
  rest into a hadronic one. ``<f_em> = 1 - (E / E0)^(m - 1)`` (Groom; E0 = 1 GeV, m = 0.83) and
  ``f_em`` fluctuates shower by shower as a Beta variable around it.
* Electromagnetic component: GFLASH (Grindhammer-Peters) longitudinal gamma profile in X0 with
  correlated per-shower fluctuations of ``T`` and ``alpha``, and the GFLASH core/tail radial
  profile in Moliere radii, for the steel/scintillator mixture.
* Hadronic component: the hadronic term of the Bock et al. (1981) profile, a gamma profile in
  interaction lengths ``(s/lambda)^(a-1) exp(-d s/lambda)`` with ``a = 0.6165 + 0.3183 ln E`` and
  ``d = 0.9099 - 0.0237 ln E`` (E in GeV), with a per-shower log-normal fluctuation of ``a``; its
  lateral profile is a core + halo mixture of ``2 r R^2 / (r^2 + R^2)^2`` components whose radii
  grow linearly with depth.
* Energies are deposited by Monte-Carlo spots, summed per cell, and turned into visible
  (scintillator) energy with Gamma-distributed sampling fluctuations of stochastic terms
  ``a_em`` and ``a_had`` (per unit deposited energy): ``E_vis = f_samp (E_em + (h/e) E_had)`` on
  average. Cells below the threshold are dropped.

:func:`simulate_chunk` makes the showers of one chunk with its own generator; :func:`pack_cells`
sums deposits into cells and builds the point-cloud layout of :mod:`fpcd.data.calo`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PION_MASS_GEV = 0.13957
ELECTRON_MASS_GEV = 0.000511


@dataclasses.dataclass(frozen=True)
class CaloGeometry:
    """An ePIC-like forward hadronic sampling calorimeter and its response.

    Geometry from the note: 55 layers of 23.4 mm pitch (20 mm steel + 3 mm scintillator + gap),
    layer centres from 3820 mm; 55 x 55 transverse cells of 100 mm spanning +-2750 mm.
    Material constants are the PDG values for iron and polystyrene; the effective X0, lambda_I
    and Moliere radius of a layer are thickness-weighted harmonic means.

    Response: ``sampling_fraction`` is the electromagnetic visible/deposited ratio (MIP fraction
    0.6156 / 23.48 MeV = 0.026 times e/mip ~ 0.85); ``hadron_to_electron`` is h/e of a
    non-compensating steel/scintillator calorimeter; ``em_stochastic`` / ``hadronic_stochastic``
    are the sampling-fluctuation terms in sqrt(GeV) of deposited energy. The hadronic lateral
    radii (in lambda_I) put ~95 % of the energy within ~1 lambda_I, the usual containment figure.
    """

    num_layers: int = 55
    layer_pitch_mm: float = 23.4
    first_layer_z_mm: float = 3820.0
    num_cells: int = 55
    cell_size_mm: float = 100.0
    absorber_mm: float = 20.0
    active_mm: float = 3.0
    # Iron (absorber) and polystyrene (scintillator), PDG.
    absorber_x0_mm: float = 17.57
    absorber_lambda_mm: float = 167.7
    absorber_moliere_mm: float = 17.19
    absorber_z: float = 26.0
    absorber_a: float = 55.845
    absorber_x0_gcm2: float = 13.84
    active_x0_mm: float = 413.1
    active_lambda_mm: float = 770.7
    active_moliere_mm: float = 94.1
    pion_interaction_factor: float = 1.2  # pion interaction length / lambda_I
    # Response.
    sampling_fraction: float = 0.022
    hadron_to_electron: float = 0.7
    em_fraction_e0_gev: float = 1.0
    em_fraction_exponent: float = 0.83
    em_fraction_concentration: float = 12.0
    em_stochastic: float = 0.25
    hadronic_stochastic: float = 0.45
    hadronic_shape_spread: float = 0.2
    mip_visible_mev: float = 0.6156
    mip_fluctuation_shape: float = 6.0
    threshold_mev: float = 0.3
    core_radius_lambda: tuple = (0.03, 0.02)  # R = c0 + c1 * depth (both in lambda_I)
    halo_radius_lambda: tuple = (0.12, 0.06)
    core_weight: float = 0.6
    em_spots: int = 256
    hadronic_spots: int = 1024
    max_cells: int = 200

    def _effective(self, absorber, active):
        return self.layer_pitch_mm / (self.absorber_mm / absorber + self.active_mm / active)

    @property
    def x0_mm(self) -> float:
        return self._effective(self.absorber_x0_mm, self.active_x0_mm)

    @property
    def lambda_mm(self) -> float:
        return self._effective(self.absorber_lambda_mm, self.active_lambda_mm)

    @property
    def moliere_mm(self) -> float:
        return self._effective(self.absorber_moliere_mm, self.active_moliere_mm)

    @property
    def critical_energy_mev(self) -> float:
        """E_c = 2.66 (X0 Z / A)^1.1 MeV with X0 in g/cm^2 (note (b)); 20.7 MeV for iron."""
        return 2.66 * (self.absorber_x0_gcm2 * self.absorber_z / self.absorber_a) ** 1.1

    @property
    def front_z_mm(self) -> float:
        return self.first_layer_z_mm - 0.5 * self.layer_pitch_mm

    @property
    def half_width_mm(self) -> float:
        return 0.5 * self.num_cells * self.cell_size_mm

    def layer_centres(self) -> np.ndarray:
        return self.first_layer_z_mm + self.layer_pitch_mm * np.arange(self.num_layers)

    def cell_centres(self) -> np.ndarray:
        return -self.half_width_mm + self.cell_size_mm * (np.arange(self.num_cells) + 0.5)

    def mean_em_fraction(self, energy_gev):
        e = np.maximum(np.asarray(energy_gev, np.float64), self.em_fraction_e0_gev)
        return 1.0 - (e / self.em_fraction_e0_gev) ** (self.em_fraction_exponent - 1.0)

    def mean_response(self, energy_gev):
        """Expected visible energy per GeV of showering energy: ``f_samp (<f_em> + h/e (1 - <f_em>))``."""
        f_em = self.mean_em_fraction(energy_gev)
        return self.sampling_fraction * (f_em + self.hadron_to_electron * (1.0 - f_em))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EPIC_FORWARD_HCAL = CaloGeometry()


def _direction(theta, phi):
    """Unit direction and two unit vectors perpendicular to it, each (n, 3)."""
    st, ct, sp, cp = np.sin(theta), np.cos(theta), np.sin(phi), np.cos(phi)
    axis = np.stack([st * cp, st * sp, ct], axis=-1)
    e1 = np.stack([ct * cp, ct * sp, -st], axis=-1)
    e2 = np.stack([-sp, cp, np.zeros_like(sp)], axis=-1)
    return axis, e1, e2


def _gflash_parameters(rng, energy_gev, g: CaloGeometry):
    """Per-shower GFLASH (T, alpha) and the mean alpha, from the note's formulas (y >= 1 GeV / E_c)."""
    y = np.maximum(energy_gev, 1.0) * 1000.0 / g.critical_energy_mev
    ln_y = np.log(y)
    mean_ln_t = np.log(ln_y - 0.812)
    mean_ln_alpha = np.log(0.81 + (0.458 + 2.26 / g.absorber_z) * ln_y)
    sigma_t = 1.0 / (-1.4 + 1.26 * ln_y)
    sigma_alpha = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = 0.705 - 0.023 * ln_y
    z1, z2 = rng.standard_normal((2,) + energy_gev.shape)
    a, b = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    t_max = np.exp(mean_ln_t + sigma_t * (a * z1 + b * z2))
    alpha = np.maximum(np.exp(mean_ln_alpha + sigma_alpha * (a * z1 - b * z2)), 1.05)
    return t_max, alpha, np.exp(mean_ln_alpha)


def _lorentzian_radius(rng, scale):
    """Radii distributed as ``2 r R^2 / (r^2 + R^2)^2`` (inverse CDF, capped at 14 R)."""
    u = np.minimum(rng.random(scale.shape), 0.995)
    return scale * np.sqrt(u / (1.0 - u))


def em_spots(rng, energy_em, g: CaloGeometry):
    """Electromagnetic spots: (depth along the axis [mm], radius [mm], energy [GeV]) each (n, K)."""
    n, k = len(energy_em), g.em_spots
    t_max, alpha, mean_alpha = _gflash_parameters(rng, energy_em, g)
    beta = (alpha - 1.0) / t_max
    t = rng.standard_gamma(np.repeat(alpha[:, None], k, axis=1)) / beta[:, None]  # X0
    # GFLASH radial profile at the depth variable tau (note (b)); E in GeV.
    ln_e = np.log(np.maximum(energy_em, 1e-3))[:, None]
    z = g.absorber_z
    tau = (t / t_max[:, None]) * ((alpha[:, None] - 1) / alpha[:, None]) * (mean_alpha[:, None] / (mean_alpha[:, None] - 1))
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k4 = 0.3585 + 0.0412 * ln_e
    r_tail = (0.659 - 0.00309 * z) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    p3 = 1.313 - 0.0686 * ln_e
    arg = ((0.401 + 0.00187 * z) - tau) / p3
    p_core = (2.632 - 0.00094 * z) * np.exp(arg - np.exp(arg))
    scale = np.where(rng.random((n, k)) < p_core, r_core, r_tail) * g.moliere_mm
    radius = _lorentzian_radius(rng, scale)
    energy = np.repeat((energy_em / k)[:, None], k, axis=1)
    return t * g.x0_mm, radius, energy


def bock_hadronic_shape(energy_gev):
    """``(a, d)`` of the hadronic term of the Bock et al. profile ``(s/lambda)^(a-1) exp(-d s/lambda)``."""
    ln_e = np.log(energy_gev)
    return 0.6165 + 0.3183 * ln_e, 0.9099 - 0.0237 * ln_e


def _hadronic_spots(rng, energy, energy_had, g: CaloGeometry):
    n, k = len(energy), g.hadronic_spots
    a, d = bock_hadronic_shape(np.maximum(energy, 0.2))
    a = a * np.exp(g.hadronic_shape_spread * rng.standard_normal(n) - 0.5 * g.hadronic_shape_spread**2)
    depth = rng.standard_gamma(np.repeat(a[:, None], k, axis=1)) / d[:, None]  # lambda_I
    c0, c1 = g.core_radius_lambda
    h0, h1 = g.halo_radius_lambda
    core = rng.random((n, k)) < g.core_weight
    scale = np.where(core, c0 + c1 * depth, h0 + h1 * depth) * g.lambda_mm
    radius = _lorentzian_radius(rng, scale)
    energy_spot = np.repeat((energy_had / k)[:, None], k, axis=1)
    return depth * g.lambda_mm, radius, energy_spot


def _flat_cell_index(points, g: CaloGeometry):
    """Flat cell index (layer, ix, iy) of points (..., 3) in mm, -1 outside the calorimeter."""
    layer = np.floor((points[..., 2] - g.front_z_mm) / g.layer_pitch_mm)
    ix = np.floor((points[..., 0] + g.half_width_mm) / g.cell_size_mm)
    iy = np.floor((points[..., 1] + g.half_width_mm) / g.cell_size_mm)
    inside = (layer >= 0) & (layer < g.num_layers) & (ix >= 0) & (ix < g.num_cells) & (iy >= 0) & (iy < g.num_cells)
    flat = (layer * g.num_cells + ix) * g.num_cells + iy
    return np.where(inside, flat, -1).astype(np.int64)


def _cell_centre(flat, g: CaloGeometry):
    iy = flat % g.num_cells
    ix = (flat // g.num_cells) % g.num_cells
    layer = flat // (g.num_cells * g.num_cells)
    centres = g.cell_centres()
    return centres[ix], centres[iy], g.layer_centres()[layer]


def pack_cells(shower, flat_cell, energy, num_showers: int, max_cells: int,
               geometry: CaloGeometry = EPIC_FORWARD_HCAL):
    """Point clouds from (shower index, flat cell index ``(layer * C + ix) * C + iy``, energy) entries.

    Entries of the same cell of a shower are summed; each shower keeps its ``max_cells`` most
    energetic cells (sorted, at their cell centres). Returns ``(cells (n, max_cells, 5),
    num_hit_cells (n,) before the cap, dropped_energy (n,))``.
    """
    g = geometry
    num_grid = g.num_layers * g.num_cells * g.num_cells
    key = np.asarray(shower, np.int64) * num_grid + np.asarray(flat_cell, np.int64)
    unique, inverse = np.unique(key, return_inverse=True)
    energy = np.bincount(inverse.ravel(), weights=np.asarray(energy, np.float64).ravel(), minlength=len(unique))
    shower, cell = unique // num_grid, unique % num_grid
    order = np.lexsort((-energy, shower))
    shower, cell, energy = shower[order], cell[order], energy[order]
    counts = np.bincount(shower, minlength=num_showers)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rank = np.arange(len(shower)) - starts[shower]
    kept = rank < max_cells
    dropped = np.bincount(shower[~kept], weights=energy[~kept], minlength=num_showers)
    shower, cell, energy, rank = shower[kept], cell[kept], energy[kept], rank[kept]
    cells = np.zeros((num_showers, max_cells, 5), np.float32)
    x, y, z = _cell_centre(cell, g)
    cells[shower, rank] = np.stack([energy, x, y, z, np.ones_like(energy)], axis=-1)
    return cells, counts, dropped.astype(np.float32)


def simulate_chunk(rng, momentum, theta, phi, g: CaloGeometry, max_cells: int, particle: str):
    """The showers of one chunk drawn with ``rng``: momenta [GeV], polar and azimuthal angles [rad],
    each ``(n,)``; ``particle`` ``"pion"`` or ``"electron"``. Returns ``(cells (n, max_cells, 5),
    cluster (n, 4), dropped_energy (n,), truth dict)`` in the layout of :mod:`fpcd.data.calo`."""
    n = len(momentum)
    mass = PION_MASS_GEV if particle == "pion" else ELECTRON_MASS_GEV
    energy = np.sqrt(momentum**2 + mass**2) - mass  # kinetic energy
    axis, e1, e2 = _direction(theta, phi)
    path_front = g.front_z_mm / axis[:, 2]
    interaction = rng.exponential(g.pion_interaction_factor * g.lambda_mm, n)
    mean_f = np.clip(g.mean_em_fraction(energy), 0.02, 0.98)
    kappa = g.em_fraction_concentration
    f_em = rng.beta(mean_f * kappa, (1 - mean_f) * kappa)
    if particle == "electron":  # showers from the front face, all electromagnetic
        interaction, f_em = np.zeros(n), np.ones(n)
    path_first = path_front + interaction
    energy_em, energy_had = f_em * energy, (1 - f_em) * energy

    kinds, points, deposits = [], [], []
    for kind, (depth, radius, e_spot) in enumerate((em_spots(rng, energy_em, g),
                                                    _hadronic_spots(rng, energy, energy_had, g))):
        angle = rng.uniform(0, 2 * np.pi, depth.shape)
        position = ((path_first[:, None] + depth)[..., None] * axis[:, None, :]
                    + (radius * np.cos(angle))[..., None] * e1[:, None, :]
                    + (radius * np.sin(angle))[..., None] * e2[:, None, :])
        points.append(position.reshape(n, -1, 3))
        deposits.append(e_spot.reshape(n, -1))
        kinds.append(np.full(deposits[-1].shape, kind))
    # The MIP track before the first interaction: one hit per layer crossed.
    path_layers = g.layer_centres()[None, :] / axis[:, 2:3]
    crossed = path_layers < path_first[:, None]
    points.append(path_layers[..., None] * axis[:, None, :])
    mip = rng.standard_gamma(g.mip_fluctuation_shape, crossed.shape) / g.mip_fluctuation_shape
    deposits.append(np.where(crossed, mip * g.mip_visible_mev * 1e-3 / axis[:, 2:3], 0.0))
    kinds.append(np.full(crossed.shape, 2))

    flat = _flat_cell_index(np.concatenate(points, axis=1), g)
    deposit = np.concatenate(deposits, axis=1)
    kind = np.concatenate(kinds, axis=1)
    keep = (flat >= 0) & (deposit > 0)
    num_grid = g.num_layers * g.num_cells * g.num_cells
    key = (np.arange(n)[:, None] * num_grid + flat)[keep]
    unique, inverse = np.unique(key, return_inverse=True)
    sums = [np.bincount(inverse, weights=deposit[keep] * (kind[keep] == c), minlength=len(unique)) for c in range(3)]
    # Sampling fluctuations: Gamma with variance a^2 E (GeV) per unit deposited energy.
    eps_em, eps_had = g.em_stochastic**2, g.hadronic_stochastic**2
    visible_em = rng.standard_gamma(sums[0] / eps_em) * eps_em
    visible_had = rng.standard_gamma(sums[1] / eps_had) * eps_had
    visible = g.sampling_fraction * (visible_em + g.hadron_to_electron * visible_had) + sums[2]
    above = visible > g.threshold_mev * 1e-3
    cells, counts, dropped = pack_cells(unique[above] // num_grid, unique[above] % num_grid, visible[above], n,
                                        max_cells, g)
    num = np.minimum(counts, max_cells)
    cluster = np.stack([momentum, np.degrees(theta), cells[..., 0].sum(axis=1), num], axis=1).astype(np.float32)
    truth = {"first_interaction_mm": (path_first - path_front) * axis[:, 2], "em_fraction": f_em,
             "kinetic_energy": energy}
    return cells, cluster, dropped, truth
