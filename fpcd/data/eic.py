"""EIC neutral-current deep-inelastic scattering events as point clouds: Pythia 8 generator and loader.

Events (Devlin, Qiu, Ringer, Sato 2023; Araz, Mikuni et al. 2024; ``../shared/physics/eic.md``) are
e- p collisions at the EIC, 10 GeV electrons on 275 GeV protons, stored in the public raw layout of
the OmniLearn ``EicPythia`` files:

* ``particles (N, 50, 5)`` = (pT [GeV], eta, phi, PDG id, z = 2 E / sqrt(s)), in the e p centre-of-mass
  frame with the proton along +z. Row 0 is the scattered electron e' (identified from the hard
  process); the other stable final-state particles follow in decreasing pT, capped at 49, then zero
  padding (PDG id 0). Over a complete event (about 99 % of them: the rest have more than 49 other
  particles) the z values sum to 2 and the charges to 0.
* ``kinematics (N, 4)`` = (Q^2 [GeV^2], x, y, W [GeV]) by the electron method (exact four-vectors,
  beam masses included).

:func:`generate` runs Pythia 8 (``pythia8mc``) with the verified recipe of the physics note
(:func:`pythia_settings`); :func:`load` reads fpcd's files and any file in the same layout.
Species: the stable particles fall into the 9 classes of :data:`SPECIES` (the public one-hot);
:func:`species_index` and :func:`charge_of` map PDG ids to them and to their true electric charge.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from typing import Sequence

import numpy as np

from fpcd.data import common
from fpcd.data.common import GeneratorSettingsBase, check_integer, chunk_sizes, generate_in_chunks, save_hdf5
from fpcd.data.kinematics import boost_z
from fpcd.errors import DataError
from fpcd.io import open_hdf5, silenced_stdout

ELECTRON_ENERGY = 10.0  # GeV, along -z in the lab
PROTON_ENERGY = 275.0  # GeV, along +z in the lab
ELECTRON_MASS = 0.00051099895
PROTON_MASS = 0.93827208816
MAX_PARTICLES = 50  # e' included (row 0)

#: The 9 species classes of the public one-hot, in its order, with the |PDG ids| of each.
SPECIES = ("p", "n", "K", "pi", "nu", "mu", "e", "gamma", "K0L")
_SPECIES_IDS = {2212: 0, 2112: 1, 321: 2, 211: 3, 12: 4, 14: 4, 16: 4, 13: 5, 11: 6, 22: 7, 130: 8}
#: Charge of the particle (positive PDG id) of each class; antiparticles have the opposite charge.
SPECIES_CHARGE = np.array([1, 0, 1, 1, 0, -1, -1, 0, 0], np.int64)
#: Masses assigned per class for physics checks [GeV] (the physics note's values).
SPECIES_MASS = np.array([0.938272, 0.939565, 0.493677, 0.139570, 0.0, 0.105658, 0.000511, 0.0, 0.497611])
#: The PDG id that (class, charge) maps back to; neutrons and neutrinos keep no particle/antiparticle
#: or flavour information in the 9-class one-hot, so they come back as 2112 and 14 (nu_mu, the most frequent).
REPRESENTATIVE_ID = np.array([2212, 2112, 321, 211, 14, 13, 11, 22, 130], np.int64)


class EicDataError(DataError):
    """An EIC event file is missing, has the wrong layout, or holds invalid values."""


def beams() -> tuple[np.ndarray, np.ndarray]:
    """Lab four-momenta (E, px, py, pz) of the electron (along -z) and proton (along +z) beams."""
    p_e = np.sqrt(ELECTRON_ENERGY**2 - ELECTRON_MASS**2)
    p_p = np.sqrt(PROTON_ENERGY**2 - PROTON_MASS**2)
    return np.array([ELECTRON_ENERGY, 0.0, 0.0, -p_e]), np.array([PROTON_ENERGY, 0.0, 0.0, p_p])


def sqrt_s() -> float:
    """The e p centre-of-mass energy [GeV] (104.885 with the beam masses; 2 sqrt(E_e E_p) = 104.881)."""
    k, p = beams()
    total = k + p
    return float(np.sqrt(total[0] ** 2 - total[3] ** 2))


def cm_boost_beta() -> float:
    """Velocity of the centre-of-mass frame in the lab (along +z)."""
    k, p = beams()
    return float((k[3] + p[3]) / (k[0] + p[0]))


def species_index(pdg) -> np.ndarray:
    """Class index in :data:`SPECIES` of each PDG id (-1 for ids outside the 9 classes, and for 0)."""
    pdg = np.abs(np.asarray(pdg, np.int64))
    out = np.full(pdg.shape, -1, np.int64)
    for pid, cls in _SPECIES_IDS.items():
        out[pdg == pid] = cls
    return out


def charge_of(pdg) -> np.ndarray:
    """True electric charge (units of e) of each PDG id of the 9 classes (0 for padding)."""
    pdg = np.asarray(pdg, np.int64)
    cls = species_index(pdg)
    return np.where(cls >= 0, SPECIES_CHARGE[np.maximum(cls, 0)] * np.sign(pdg), 0)


def pdg_from_species(cls, charge) -> np.ndarray:
    """PDG ids of (class index, charge) pairs: the inverse of (:func:`species_index`, :func:`charge_of`)
    up to what the classes do not hold (n vs n-bar, neutrino flavour; see :data:`REPRESENTATIVE_ID`)."""
    cls = np.asarray(cls, np.int64)
    charge = np.asarray(charge, np.int64)
    outside = (cls < 0) | (cls >= len(SPECIES))
    if np.any(outside):
        raise ValueError(f"class indices must be in [0, {len(SPECIES)}), got {sorted(set(cls[outside].tolist()))[:5]}")
    base = REPRESENTATIVE_ID[cls]
    positive = SPECIES_CHARGE[cls]
    sign = np.where((positive != 0) & (charge != 0) & (np.sign(charge) != np.sign(positive)), -1, 1)
    return base * sign


def dis_kinematics(electron_cm) -> np.ndarray:
    """``(N, 4)`` = (Q^2, x, y, W) of scattered electrons given as CM-frame (pT, eta, phi) rows
    ``(N, 3)`` (electron method; the electron mass is used for its energy)."""
    electron_cm = np.asarray(electron_cm, np.float64)
    pt, eta, phi = electron_cm[:, 0], electron_cm[:, 1], electron_cm[:, 2]
    pz = pt * np.sinh(eta)
    e = np.sqrt(pt**2 + pz**2 + ELECTRON_MASS**2)
    k, p = beams()
    beta = cm_boost_beta()
    k_cm, p_cm = np.array(k), np.array(p)
    k_cm[0], k_cm[3] = boost_z(k[0], k[3], beta)
    p_cm[0], p_cm[3] = boost_z(p[0], p[3], beta)
    q = np.stack([k_cm[0] - e, -pt * np.cos(phi), -pt * np.sin(phi), k_cm[3] - pz], axis=1)

    def dot(a, b):
        return a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1] - a[..., 2] * b[..., 2] - a[..., 3] * b[..., 3]

    q2 = -dot(q, q)
    p_dot_q = dot(p_cm, q)
    y = p_dot_q / dot(p_cm, k_cm)
    x = q2 / (2.0 * p_dot_q)
    w2 = dot(p_cm + q, p_cm + q)
    return np.stack([q2, x, y, np.sqrt(np.maximum(w2, 0.0))], axis=1)


@dataclasses.dataclass(frozen=True)
class EventSet:
    """DIS events in the public raw layout (float32).

    Attributes:
      particles: ``(N, 50, 5)`` = (pT, eta, phi, PDG id, z); row 0 the scattered electron, padding zero.
      kinematics: ``(N, 4)`` = (Q^2, x, y, W) of the event (electron method).
    """

    particles: np.ndarray
    kinematics: np.ndarray

    def __post_init__(self):
        p, k = self.particles, self.kinematics
        if p.ndim != 3 or p.shape[2] != 5 or p.shape[1] < 2:
            raise ValueError(f"particles must have shape (N, P, 5) with P >= 2, got {p.shape}")
        if k.ndim != 2 or k.shape != (p.shape[0], 4):
            raise ValueError(f"kinematics must have shape ({p.shape[0]}, 4), got {k.shape}")

    def __len__(self) -> int:
        return self.particles.shape[0]

    @property
    def mask(self) -> np.ndarray:
        """``(N, P)`` boolean: True for real entries (electron included)."""
        return self.particles[..., 3] != 0

    @property
    def multiplicity(self) -> np.ndarray:
        """``(N,)`` number of particles besides the scattered electron."""
        return self.mask[:, 1:].sum(axis=1)

    @property
    def electron(self) -> np.ndarray:
        """``(N, 3)`` = (pT, eta, phi) of the scattered electron."""
        return self.particles[:, 0, :3]

    @property
    def charges(self) -> np.ndarray:
        """``(N, P)`` true charges (0 on padding)."""
        return charge_of(np.rint(self.particles[..., 3]).astype(np.int64))

    def take(self, index) -> "EventSet":
        return EventSet(self.particles[index], self.kinematics[index])


@dataclasses.dataclass(frozen=True)
class GeneratorSettings(GeneratorSettingsBase):
    """Every physics choice of :func:`generate` (part of the cache key).

    Neutral current only: the layout needs the scattered electron in row 0, which a charged-current
    event (an outgoing neutrino) does not have.

    Attributes:
      q2_min: ``PhaseSpace:Q2Min`` [GeV^2].
      extra: additional Pythia settings strings.
    """

    q2_min: float = 25.0
    extra: tuple[str, ...] = ()


def pythia_settings(seed: int, settings: GeneratorSettings) -> list[str]:
    """The Pythia configuration strings of one generator instance (the physics note's verified recipe)."""
    return [
        "Beams:frameType = 2",
        "Beams:idA = 2212", f"Beams:eA = {PROTON_ENERGY}",
        "Beams:idB = 11", f"Beams:eB = {ELECTRON_ENERGY}",
        "WeakBosonExchange:ff2ff(t:gmZ) = on",
        "WeakBosonExchange:ff2ff(t:W) = off",
        f"PhaseSpace:Q2Min = {settings.q2_min}",
        "SpaceShower:dipoleRecoil = on",
        "SpaceShower:pTmaxMatch = 2",
        "PDF:lepton = off",
        "TimeShower:QEDshowerByL = off",
        "Print:quiet = on", "Next:numberCount = 0", "Next:numberShowEvent = 0", "Next:numberShowInfo = 0",
        "Next:numberShowProcess = 0",
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        *settings.extra,
    ]


SEED_STREAM = 7_177  # the stream of :func:`fpcd.data.common.chunk_seed`, apart from the jet types' 0..4


def chunk_seed(seed: int, chunk: int) -> int:
    """Pythia seed of chunk ``chunk``: a function of ``(seed, chunk)`` only."""
    return common.chunk_seed(seed, SEED_STREAM, chunk)


def _bottom_copy(index: int, ids, d1, d2) -> int:
    """Follow ``index`` down its chain of same-id daughters (Pythia's ``iBotCopyId``)."""
    while True:
        a, b = int(d1[index]), int(d2[index])
        if a <= 0:
            return index
        daughters = range(a, b + 1) if b >= a else (a, b) if b > 0 else (a,)
        same = [i for i in daughters if ids[i] == ids[index]]
        if len(same) != 1:
            return index
        index = same[0]


def event_rows(ids, status, d1, d2, momenta, beta: float, root_s: float):
    """The raw rows ``(50, 5)`` of one lab-frame event record, or None when no scattered electron is found.

    Args:
      ids, status, d1, d2: PDG ids, status codes and daughter indices of the event record.
      momenta: ``(n, 4)`` lab (px, py, pz, E).
      beta: CM velocity along +z; root_s: sqrt(s) (for z = 2 E_cm / sqrt(s)).
    """
    hard = np.flatnonzero((np.abs(status) == 23) & (np.abs(ids) == 11))
    if len(hard) == 0:
        return None
    electron = _bottom_copy(int(hard[0]), ids, d1, d2)
    final = status > 0
    if not final[electron]:
        return None
    px, py = momenta[:, 0], momenta[:, 1]
    e_cm, pz_cm = boost_z(momenta[:, 3], momenta[:, 2], beta)
    pt = np.hypot(px, py)
    others = np.flatnonzero(final)
    others = others[others != electron]
    order = others[np.argsort(-pt[others], kind="stable")][: MAX_PARTICLES - 1]
    rows = np.concatenate([[electron], order])
    out = np.zeros((MAX_PARTICLES, 5), np.float64)
    n = len(rows)
    out[:n, 0] = pt[rows]
    out[:n, 1] = np.arcsinh(pz_cm[rows] / np.maximum(pt[rows], 1e-12))
    out[:n, 2] = np.arctan2(py[rows], px[rows])
    out[:n, 3] = ids[rows]
    out[:n, 4] = 2.0 * e_cm[rows] / root_s
    return out


def _generate_chunk(args):
    """Worker: ``num_events`` events of one chunk with its own deterministic Pythia seed.

    Returns ``(particles (n, 50, 5) float32, kinematics (n, 4) float32, unknown species ids, number of
    events dropped for want of a scattered electron)``."""
    num_events, seed, chunk, settings = args
    import awkward as ak
    import pythia8mc

    beta, root_s = cm_boost_beta(), sqrt_s()
    rows, unknown, dropped = [], set(), 0
    with silenced_stdout():
        pythia = pythia8mc.Pythia("", False)
        for line in pythia_settings(chunk_seed(seed, chunk), settings):
            if not pythia.readString(line):
                raise ValueError(f"Pythia rejected the setting {line!r}")
        if not pythia.init():
            raise RuntimeError("Pythia failed to initialise the e p beams")
        while len(rows) < num_events:
            prt = pythia.nextBatch(min(256, 2 * (num_events - len(rows)) + 8)).prt
            counts = np.asarray(ak.num(prt.id))
            flat = {name: np.asarray(ak.flatten(getattr(prt, name))) for name in ("id", "status", "daughter1",
                                                                                   "daughter2")}
            momenta = np.stack([np.asarray(ak.flatten(getattr(prt.p, c)), np.float64) for c in ("px", "py", "pz", "e")],
                               axis=1)
            starts = np.concatenate([[0], np.cumsum(counts)])
            for a, b in zip(starts[:-1], starts[1:]):
                if len(rows) == num_events:
                    break
                event = event_rows(flat["id"][a:b], flat["status"][a:b], flat["daughter1"][a:b],
                                   flat["daughter2"][a:b], momenta[a:b], beta, root_s)
                if event is not None:
                    rows.append(event)
                else:
                    dropped += 1
    particles = np.stack(rows)
    real = particles[..., 3] != 0
    bad = real & (species_index(particles[..., 3]) < 0)
    unknown.update(int(i) for i in np.unique(particles[..., 3][bad]))
    kinematics = dis_kinematics(particles[:, 0, :3])
    return particles.astype(np.float32), kinematics.astype(np.float32), sorted(unknown), dropped


def generate(
    num_events: int,
    *,
    q2_min: float = 25.0,
    seed: int = 0,
    workers: int | None = None,
    settings: GeneratorSettings | None = None,
    chunk_size: int = 1000,
    progress: bool = True,
) -> EventSet:
    """Generate ``num_events`` neutral-current DIS events (10 GeV e- on 275 GeV p) with Pythia 8.

    Args:
      num_events: number of events.
      q2_min: minimum Q^2 [GeV^2] (``PhaseSpace:Q2Min``); ignored when ``settings`` is given.
      seed: the same seed gives identical arrays whatever ``workers`` is (events are made in
        chunks of ``chunk_size``, each with a Pythia seed derived from ``(seed, chunk)``).
      workers: worker processes (default: all CPUs, at most one per chunk); 1 runs in this process.
        Workers are fresh interpreters (:func:`fpcd.data.workers.map_chunks`): plain scripts and
        notebooks need no ``if __name__ == "__main__":`` and are never re-run.
      settings: physics choices (:class:`GeneratorSettings`); default ``GeneratorSettings(q2_min)``.
      chunk_size: events per chunk (changing it changes the events).
      progress: show a progress bar advanced per chunk.

    Raises:
      ValueError: ``num_events`` or ``chunk_size`` not a positive integer, ``seed`` not an
        integer, ``q2_min`` not a positive finite number (named).
      EicDataError: when a generated particle falls outside the 9 species classes (naming its PDG id).
    """
    q2 = q2_min if settings is None else settings.q2_min
    if isinstance(q2, (bool, np.bool_)) or not isinstance(q2, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(q2) and q2 > 0):
        raise ValueError(f"q2_min must be a positive finite number (GeV^2), got {q2!r}")
    num_events, chunk_size = check_integer("num_events", num_events), check_integer("chunk_size", chunk_size)
    seed = check_integer("seed", seed, None)
    settings = settings or GeneratorSettings(q2_min=float(q2_min))
    sizes = chunk_sizes(num_events, chunk_size)
    tasks = [(size, seed, chunk, settings) for chunk, size in enumerate(sizes)]
    results = generate_in_chunks("fpcd.data.eic:_generate_chunk", tasks, sizes, workers=workers,
                                 description="generate DIS events", unit="event", progress=progress)
    unknown = sorted({i for r in results for i in r[2]})
    if unknown:
        raise EicDataError(f"generated particles with PDG ids {unknown} outside the 9 species classes {SPECIES}")
    dropped = sum(r[3] for r in results)
    if dropped:  # rare (none in 100,000 neutral-current events): say so rather than bias the sample silently
        warnings.warn(f"fpcd.data.eic.generate: {dropped} Pythia events without a final-state scattered electron "
                      f"were skipped (kept {num_events})", RuntimeWarning, stacklevel=2)
    return EventSet(np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))


# --- files ------------------------------------------------------------------------------------


def save(events: EventSet, path: str, *, settings: GeneratorSettings | None = None, seed: int | None = None) -> str:
    """Write ``events`` atomically (hdf5 datasets ``particles`` and ``kinematics``, provenance attributes)."""
    return save_hdf5(path, {"particles": events.particles, "kinematics": events.kinematics},
                     {"generator": "fpcd pythia8mc e p DIS",
                      "beams": f"e- {ELECTRON_ENERGY} GeV on p {PROTON_ENERGY} GeV, e p CM frame, p along +z",
                      "settings": None if settings is None else settings.to_json(), "seed": seed},
                     compressed=("particles", "kinematics"))


def check_events(particles: np.ndarray, path: str = "events") -> None:
    """Raise :class:`EicDataError` naming the problem when ``particles`` is not in the raw layout:
    NaN/inf, non-integer or unknown PDG ids, padding before real entries, no electron in row 0."""
    if particles.ndim != 3 or particles.shape[2] != 5:
        raise EicDataError(f"{path}: particles has shape {particles.shape}; expected (N, P, 5)")
    bad = ~np.isfinite(particles)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EicDataError(f"{path}: particles holds {int(bad.sum())} NaN/inf values (first at index {first})")
    pdg = particles[..., 3]
    if np.any(pdg != np.rint(pdg)):
        raise EicDataError(f"{path}: particles[..., 3] must hold integer PDG ids")
    real = pdg != 0
    unknown = real & (species_index(pdg) < 0)
    if unknown.any():
        ids = sorted(int(i) for i in np.unique(pdg[unknown]))[:10]
        raise EicDataError(f"{path}: PDG ids {ids} are outside the 9 species classes {SPECIES}")
    if np.any(real[:, 1:] & ~real[:, :-1]):
        event = int(np.argwhere(real[:, 1:] & ~real[:, :-1])[0, 0])
        raise EicDataError(f"{path}: event {event} has padding (PDG id 0) before a real particle; real entries "
                           "must come first")
    no_pt = real & (particles[..., 0] <= 0)
    if no_pt.any():
        event, row = (int(i) for i in np.argwhere(no_pt)[0])
        raise EicDataError(f"{path}: {int(no_pt.sum())} real particles have pT <= 0 (first: event {event}, row {row})")
    electron = np.abs(pdg[:, 0]) != 11
    if electron.any():
        raise EicDataError(f"{path}: {int(electron.sum())} events have no electron in row 0 (first: event "
                           f"{int(np.flatnonzero(electron)[0])}); row 0 must be the scattered electron")


def load(path: str) -> EventSet:
    """Read an EIC events file (datasets ``particles`` (N, P, 5) and ``kinematics`` (N, 4)).

    Files without ``kinematics`` (e.g. the public particle files) get it recomputed from the
    electron in row 0.

    Raises:
      EicDataError: missing file or dataset, wrong shapes, NaN/inf, unknown species, no electron
        in row 0, with the file and the problem named.
    """
    with open_hdf5(path, EicDataError) as f:
        if "particles" not in f:
            raise EicDataError(f"{path}: missing dataset 'particles' (found {sorted(f.keys())}); expected the EIC "
                               "layout particles (N, 50, 5) = (pT, eta, phi, PDG id, z)")
        particles = np.asarray(f["particles"][()], np.float32)
        kinematics = np.asarray(f["kinematics"][()], np.float32) if "kinematics" in f else None
    if particles.ndim != 3 or particles.shape[2] != 5 or particles.shape[1] < 2:
        raise EicDataError(f"{path}: particles has shape {particles.shape}; expected (N, P, 5) = "
                           "(pT, eta, phi, PDG id, z)")
    check_events(particles, path)
    if kinematics is None:
        kinematics = dis_kinematics(particles[:, 0, :3]).astype(np.float32)
    if kinematics.shape != (particles.shape[0], 4):
        raise EicDataError(f"{path}: kinematics has shape {kinematics.shape}; expected ({particles.shape[0]}, 4) = "
                           "(Q2, x, y, W)")
    if not np.all(np.isfinite(kinematics)):
        raise EicDataError(f"{path}: kinematics holds NaN/inf values")
    return EventSet(particles, kinematics)


def cached_generate(
    num_events: int,
    *,
    q2_min: float = 25.0,
    seed: int = 0,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> EventSet:
    """:func:`generate` once, then reuse ``<cache_dir>/eic/dis_n<N>_seed<s>_<settings>.h5`` (written atomically;
    :func:`fpcd.data.common.cached_generate`)."""
    settings = GeneratorSettings(q2_min=float(q2_min))
    path = common.cache_path("eic", f"dis_n{num_events}_seed{seed}", settings, cache_dir)
    return common.cached_generate(
        path, lambda: generate(num_events, seed=seed, workers=workers, settings=settings, progress=progress),
        lambda events, p: save(events, p, settings=settings, seed=seed), load)


def summary(events: EventSet) -> dict:
    """Means a physicist checks first (electron pT and eta, multiplicity, Q^2 median, charge and z sums)."""
    charge_sum = events.charges.sum(axis=1)
    z_sum = np.where(events.mask, events.particles[..., 4], 0.0).sum(axis=1)
    return {
        "electron_pt_mean": float(events.electron[:, 0].mean()), "electron_pt_std": float(events.electron[:, 0].std()),
        "electron_eta_mean": float(events.electron[:, 1].mean()),
        "electron_eta_std": float(events.electron[:, 1].std()),
        "multiplicity_mean": float(events.multiplicity.mean()), "multiplicity_std": float(events.multiplicity.std()),
        "q2_median": float(np.median(events.kinematics[:, 0])),
        "fraction_charge_conserved": float(np.mean(charge_sum == 0)),
        "fraction_z_sum_within_5_percent": float(np.mean(np.abs(z_sum - 2.0) < 0.1)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    # Under ``python -m fpcd.data.eic`` this module is ``__main__``: build the settings from the importable
    # module, whose classes the worker processes can unpickle.
    from fpcd.data.eic import GeneratorSettings, generate, save  # noqa: F811
    parser = argparse.ArgumentParser(
        prog="python -m fpcd.data.eic",
        description="Generate neutral-current DIS events (10 GeV e- on 275 GeV p) with Pythia 8 into an hdf5 file.",
    )
    parser.add_argument("--num_events", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--q2_min", type=float, default=25.0, help="minimum Q^2 [GeV^2]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--chunk_size", type=int, default=1000, help="events per chunk (changing it changes the events)")
    args = parser.parse_args(argv)
    settings = GeneratorSettings(q2_min=args.q2_min)
    start = time.perf_counter()
    events = generate(args.num_events, seed=args.seed, workers=args.workers, settings=settings,
                      chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    save(events, args.out, settings=settings, seed=args.seed)
    s = summary(events)
    print(f"wrote {len(events)} events to {args.out} in {seconds:.1f} s ({len(events) / seconds:.0f} events/s): "
          f"electron pT {s['electron_pt_mean']:.2f} GeV, eta {s['electron_eta_mean']:.2f}, multiplicity "
          f"{s['multiplicity_mean']:.1f}, median Q2 {s['q2_median']:.1f} GeV2")


if __name__ == "__main__":
    main()
