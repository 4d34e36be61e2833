"""JetNet jets: an offline Pythia 8 + FastJet generator in the JetNet layout, and the loader.

The public JetNet dataset (Kansal et al. 2021) holds, per jet type (g, q, t, w, z), the 30 or 150
highest-pT constituents of anti-kT R = 0.8 jets from 13 TeV pp collisions, as

* ``particle_features (N, P, 4)`` = (eta_rel, phi_rel, pt_rel, mask), zero-padded, and
* ``jet_features (N, 4)`` = (pT [GeV], eta, mass [GeV], num_particles), describing the full jet
  (all constituents), with ``num_particles`` capped at ``P``.

:func:`generate` makes statistically similar jets offline with Pythia 8 (``pythia8mc``) and FastJet
(``fastjet``); :func:`load` reads the real files and fpcd's own through the same code.

Recipe (``../shared/physics/jetnet.md``; :class:`GeneratorSettings` holds every knob):

* 13 TeV pp, hard process per type, ``pTHat`` in [950, 1050] GeV, Monash tune.
  g: ``HardQCD:gg2gg, qqbar2gg``; q: ``HardQCD:qq2qq, qqbar2qqbarNew``; t: ``Top:gg2ttbar,
  qqbar2ttbar``; w: ``WeakBosonAndParton:qqbar2Wg, qg2Wq``; z: ``WeakBosonAndParton:qqbar2gmZg,
  qg2gmZq`` with pure Z; W and Z (also from tops) decay to quarks only.
* Every final-state particle but neutrinos with ``pT > min_particle_pt`` is clustered with anti-kT,
  R = 0.8 (jets above 100 GeV). The jet is the leading one with ``|eta| < 2.5``; for t, w and z
  the leading one within ``dR < 0.8`` of the last copy of a t/W/Z (the recoiling parton's jet is
  often harder). Jets outside ``0.8 < pT < 1.6 TeV`` are dropped.
* Constituents sorted by pT; ``eta_rel = eta_i - eta_J``, ``phi_rel = phi_i - phi_J`` wrapped to
  (-pi, pi], ``pt_rel = pT_i / pT_J``.

Generated vs JetNet means (``benchmarks/README.md`` has the measurement and how the default
settings were chosen).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np

from fpcd.data import common
from fpcd.data.common import GeneratorSettingsBase, check_integer, chunk_sizes, generate_in_chunks, save_hdf5
from fpcd.data.kinematics import pt_eta_phi_mass, wrap_phi
from fpcd.errors import DataError
from fpcd.io import open_hdf5, silenced_stdout

JET_TYPES = ("g", "q", "t", "w", "z")
NEUTRINOS = (12, 14, 16)
RESONANCE_ID = {"t": 6, "w": 24, "z": 23}

_COMMON = ("Beams:eCM = 13000",)
_PROCESSES = {
    "g": ("HardQCD:gg2gg = on", "HardQCD:qqbar2gg = on"),
    "q": ("HardQCD:qq2qq = on", "HardQCD:qqbar2qqbarNew = on"),
    "t": ("Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "24:onMode = off", "24:onIfAny = 1 2 3 4 5"),
    "w": ("WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", "24:onMode = off",
          "24:onIfAny = 1 2 3 4 5"),
    "z": ("WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on", "WeakZ0:gmZmode = 2",
          "23:onMode = off", "23:onIfAny = 1 2 3 4 5"),
}
_SILENT = ("Print:quiet = on", "Next:numberCount = 0", "Next:numberShowEvent = 0", "Next:numberShowInfo = 0",
           "Next:numberShowProcess = 0")


class JetDataError(DataError):
    """A jet data file is missing, has the wrong layout, or holds invalid values."""


def check_jet_type(jet_type: str) -> str:
    if jet_type not in JET_TYPES:
        raise ValueError(f"unknown jet type {jet_type!r}; expected one of {JET_TYPES}")
    return jet_type


@dataclasses.dataclass(frozen=True)
class JetSet:
    """Jets of one type in JetNet's order and units (float32).

    Attributes:
      jet_type: one of ``JET_TYPES``.
      particle_features: ``(N, P, 4)`` = (eta_rel, phi_rel, pt_rel, mask); padding rows are zero.
      jet_features: ``(N, 4)`` = (pT [GeV], eta, mass [GeV], num_particles capped at P).
    """

    jet_type: str
    particle_features: np.ndarray
    jet_features: np.ndarray

    def __post_init__(self):
        check_jet_type(self.jet_type)
        p, j = self.particle_features, self.jet_features
        if p.ndim != 3 or p.shape[2] != 4:
            raise ValueError(f"particle_features must have shape (N, P, 4), got {p.shape}")
        if j.ndim != 2 or j.shape[1] != 4 or j.shape[0] != p.shape[0]:
            raise ValueError(f"jet_features must have shape ({p.shape[0]}, 4), got {j.shape}")

    def __len__(self) -> int:
        return self.particle_features.shape[0]

    @property
    def num_particles(self) -> int:
        return self.particle_features.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """``(N, P)`` boolean: True for real constituents."""
        return self.particle_features[..., 3] > 0.5

    def take(self, index) -> "JetSet":
        """The jets at ``index`` (an index array or slice)."""
        return JetSet(self.jet_type, self.particle_features[index], self.jet_features[index])


@dataclasses.dataclass(frozen=True)
class GeneratorSettings(GeneratorSettingsBase):
    """Every physics choice of :func:`generate` (part of the cache key).

    The defaults (underlying event on, as in JetNet, and only particles above 1 GeV clustered)
    reproduce JetNet's mean multiplicities within 5% for every type and its mean masses as W1M
    sees them (30 leading constituents) within 5% for g, t, z and W (q: +24%); see
    ``benchmarks/README.md`` for the measurement. ``GeneratorSettings(min_particle_pt=0.0)`` is
    the plain Pythia recipe of the physics note (about 45% more constituents).

    Attributes:
      mpi: multiparton interactions (the underlying event) on or off.
      min_particle_pt: only final-state particles above this pT [GeV] are clustered.
      pthat_min, pthat_max: hard-process pT window [GeV].
      jet_pt_min, jet_pt_max: accepted jet pT window [GeV].
      max_abs_eta: accepted jet |eta|.
      jet_radius: anti-kT R.
      extra: additional Pythia settings strings.
    """

    mpi: bool = True
    min_particle_pt: float = 1.0
    pthat_min: float = 950.0
    pthat_max: float = 1050.0
    jet_pt_min: float = 800.0
    jet_pt_max: float = 1600.0
    max_abs_eta: float = 2.5
    jet_radius: float = 0.8
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        numbers = {name: getattr(self, name) for name in ("min_particle_pt", "pthat_min", "pthat_max", "jet_pt_min",
                                                          "jet_pt_max", "max_abs_eta", "jet_radius")}
        for name, value in numbers.items():
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise ValueError(f"GeneratorSettings.{name}={value!r}: expected a finite number")
        if self.min_particle_pt < 0:
            raise ValueError(f"GeneratorSettings.min_particle_pt={self.min_particle_pt!r}: must be >= 0 GeV")
        for low, high in (("pthat_min", "pthat_max"), ("jet_pt_min", "jet_pt_max")):
            if not 0 <= numbers[low] < numbers[high]:
                raise ValueError(f"GeneratorSettings.{low}={numbers[low]!r}, {high}={numbers[high]!r}: need "
                                 f"0 <= {low} < {high}")
        for name in ("max_abs_eta", "jet_radius"):
            if not numbers[name] > 0:
                raise ValueError(f"GeneratorSettings.{name}={numbers[name]!r}: must be positive")


def pythia_settings(jet_type: str, seed: int, settings: GeneratorSettings) -> list[str]:
    """The Pythia configuration strings for one generator instance."""
    check_jet_type(jet_type)
    return [
        *_COMMON,
        f"PhaseSpace:pTHatMin = {settings.pthat_min}",
        f"PhaseSpace:pTHatMax = {settings.pthat_max}",
        *_PROCESSES[jet_type],
        f"PartonLevel:MPI = {'on' if settings.mpi else 'off'}",
        *_SILENT,
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        *settings.extra,
    ]


def chunk_seed(seed: int, jet_type: str, chunk: int) -> int:
    """Pythia seed of chunk ``chunk``: a function of ``(seed, jet_type, chunk)`` only
    (:func:`fpcd.data.common.chunk_seed` with the type's index in :data:`JET_TYPES` as stream)."""
    return common.chunk_seed(seed, JET_TYPES.index(jet_type), chunk)


def _select_jets(events, jet_type: str, settings: GeneratorSettings):
    """Cluster a batch of Pythia events and return, per accepted event, the chosen jet's
    ``(pT, eta, phi, mass)`` and its constituents' ``(pT, eta, phi)`` arrays."""
    import awkward as ak
    import fastjet

    prt = events.prt
    aid = abs(prt.id)
    keep = (prt.status > 0) & (aid != NEUTRINOS[0]) & (aid != NEUTRINOS[1]) & (aid != NEUTRINOS[2])
    keep = keep & (np.hypot(prt.p.px, prt.p.py) > settings.min_particle_pt)
    final = prt[keep]
    particles = ak.zip({"px": final.p.px, "py": final.p.py, "pz": final.p.pz, "E": final.p.e})
    sequence = fastjet.ClusterSequence(particles, fastjet.JetDefinition(fastjet.antikt_algorithm,
                                                                         settings.jet_radius))
    jets = sequence.inclusive_jets(min_pt=100.0)
    constituents = sequence.constituents(min_pt=100.0)

    if jet_type in RESONANCE_ID:
        pdg = RESONANCE_ID[jet_type]
        first_daughter = prt[prt.daughter1]
        last_copy = (aid == pdg) & (abs(first_daughter.id) != pdg)
        resonances = prt[last_copy]
        res = [pt_eta_phi_mass(*(np.asarray(x) for x in (r.p.px, r.p.py, r.p.pz, r.p.e))) for r in resonances]
    else:
        res = None

    selected = []
    for i in range(len(jets)):
        jet = jets[i]
        if len(jet) == 0:
            continue
        pt, eta, phi, mass = pt_eta_phi_mass(*(np.asarray(jet[f], np.float64) for f in ("px", "py", "pz", "E")))
        ok = np.abs(eta) < settings.max_abs_eta
        if res is not None:
            _, r_eta, r_phi, _ = res[i]
            if len(r_eta) == 0:
                continue
            d_r = np.hypot(eta[:, None] - r_eta[None, :], wrap_phi(phi[:, None] - r_phi[None, :]))
            ok &= np.any(d_r < settings.jet_radius, axis=1)
        if not np.any(ok):
            continue
        candidates = np.flatnonzero(ok)
        best = candidates[np.argmax(pt[candidates])]
        if not settings.jet_pt_min < pt[best] < settings.jet_pt_max:
            continue
        c = constituents[i][best]
        c_pt, c_eta, c_phi, _ = pt_eta_phi_mass(*(np.asarray(c[f], np.float64) for f in ("px", "py", "pz", "E")))
        selected.append(((pt[best], eta[best], phi[best], mass[best]), (c_pt, c_eta, c_phi)))
    return selected


def jet_arrays(jet, constituents, num_particles: int):
    """JetNet rows of one jet: ``(particle_features (P, 4), jet_features (4,))`` as float32."""
    pt, eta, phi, mass = jet
    c_pt, c_eta, c_phi = constituents
    order = np.argsort(-c_pt, kind="stable")[:num_particles]
    n = len(order)
    particles = np.zeros((num_particles, 4), np.float32)
    particles[:n, 0] = c_eta[order] - eta
    particles[:n, 1] = wrap_phi(c_phi[order] - phi)
    particles[:n, 2] = c_pt[order] / pt
    particles[:n, 3] = 1.0
    features = np.array([pt, eta, mass, min(len(c_pt), num_particles)], np.float32)
    return particles, features


def _generate_chunk(args):
    """Worker: ``num_jets`` jets of one chunk with its own deterministic Pythia seed."""
    jet_type, num_jets, num_particles, seed, chunk, settings = args
    import pythia8mc

    with silenced_stdout():
        pythia = pythia8mc.Pythia("", False)
        for line in pythia_settings(jet_type, chunk_seed(seed, jet_type, chunk), settings):
            if not pythia.readString(line):
                raise ValueError(f"Pythia rejected the setting {line!r}")
        if not pythia.init():
            raise RuntimeError(f"Pythia failed to initialise for jet type {jet_type!r}")
        particles, features = [], []
        batch = 64
        while len(particles) < num_jets:
            events = pythia.nextBatch(batch)
            for jet, constituents in _select_jets(events, jet_type, settings):
                if len(particles) == num_jets:
                    break
                p, f = jet_arrays(jet, constituents, num_particles)
                particles.append(p)
                features.append(f)
    return np.stack(particles), np.stack(features)


def generate(
    jet_type: str,
    num_jets: int,
    *,
    num_particles: int = 30,
    seed: int = 0,
    workers: int | None = None,
    settings: GeneratorSettings = GeneratorSettings(),
    chunk_size: int = 250,
    progress: bool = True,
) -> JetSet:
    """Generate ``num_jets`` jets of ``jet_type`` with Pythia 8 and FastJet, in JetNet's layout.

    Args:
      jet_type: ``"g"``, ``"q"``, ``"t"``, ``"w"`` or ``"z"``.
      num_jets: number of jets.
      num_particles: constituents kept per jet (30 or 150 in JetNet; any positive number here).
      seed: the same seed gives identical arrays whatever ``workers`` is: the jets are made in
        chunks of ``chunk_size``, each with a Pythia seed derived from ``(seed, jet_type, chunk)``.
      workers: worker processes (default: all CPUs; at most one per chunk); 1 runs in this process.
        Workers are fresh interpreters (:func:`fpcd.data.workers.map_chunks`) that never import the
        caller's ``__main__``, so plain scripts and notebooks need no ``if __name__ == "__main__":``.
      settings: physics choices (:class:`GeneratorSettings`).
      chunk_size: jets per chunk, the unit of work of one worker (and of the seeds: changing it
        changes the jets).
      progress: show a progress bar, advanced as each chunk finishes.

    Raises:
      ValueError: an unknown jet type, or ``num_jets``, ``num_particles``, ``chunk_size`` not
        positive integers or ``seed`` not an integer (named).
    """
    check_jet_type(jet_type)
    num_jets, num_particles = check_integer("num_jets", num_jets), check_integer("num_particles", num_particles)
    seed, chunk_size = check_integer("seed", seed, None), check_integer("chunk_size", chunk_size)
    sizes = chunk_sizes(num_jets, chunk_size)
    tasks = [(jet_type, size, num_particles, seed, chunk, settings) for chunk, size in enumerate(sizes)]
    results = generate_in_chunks("fpcd.data.jetnet:_generate_chunk", tasks, sizes, workers=workers,
                                 description=f"generate {jet_type} jets", unit="jet", progress=progress)
    return JetSet(jet_type, np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))


# --- files ------------------------------------------------------------------------------------


def save(jets: JetSet, path: str, *, settings: GeneratorSettings | None = None, seed: int | None = None) -> str:
    """Write ``jets`` atomically in the JetNet hdf5 layout (plus provenance attributes)."""
    return save_hdf5(path, {"particle_features": jets.particle_features, "jet_features": jets.jet_features},
                     {"jet_type": jets.jet_type, "generator": "fpcd pythia8mc+fastjet",
                      "settings": None if settings is None else settings.to_json(), "seed": seed},
                     compressed=("particle_features", "jet_features"))


def _type_from_filename(path: str) -> str | None:
    stem = os.path.basename(path).split(".")[0]
    stem = stem[:-3] if stem.endswith("150") else stem[:-2] if stem.endswith("30") else stem
    return stem if stem in JET_TYPES else None


def load(path: str, *, jet_type: str | None = None, num_particles: int | None = None) -> JetSet:
    """Read a JetNet hdf5 file (the public ``g.hdf5``, ``t150.hdf5``, ... or fpcd's own).

    Args:
      path: the file.
      jet_type: expected type; default from the file's ``jet_type`` attribute or its name.
      num_particles: keep the leading ``num_particles`` constituents (``num_particles`` in
        ``jet_features`` is clipped to it, as the jetnet loader does); must not exceed the file's.

    Raises:
      JetDataError: missing file or dataset, wrong shapes, NaN/inf, an inconsistent type, or
        physically invalid jets (:func:`check_jets`: a mask other than 0/1, a jet without a real
        particle, a real particle's ``pt_rel`` outside ``(0, 1]``, a jet pT that is not positive
        or a negative jet mass), with the file, the dataset and the first bad jet named.
    """
    with open_hdf5(path, JetDataError) as f:
        for name in ("particle_features", "jet_features"):
            if name not in f:
                raise JetDataError(f"{path}: missing dataset {name!r} (found {sorted(f.keys())}); "
                                   "expected the JetNet layout")
        particles = np.asarray(f["particle_features"][()], np.float32)
        features = np.asarray(f["jet_features"][()], np.float32)
        stored_type = f.attrs.get("jet_type")
    if particles.ndim != 3 or particles.shape[2] != 4:
        raise JetDataError(f"{path}: particle_features has shape {particles.shape}; expected (N, P, 4) = "
                           "(eta_rel, phi_rel, pt_rel, mask)")
    if features.ndim != 2 or features.shape[1] != 4:
        raise JetDataError(f"{path}: jet_features has shape {features.shape}; expected (N, 4) = "
                           "(pt, eta, mass, num_particles)")
    if features.shape[0] != particles.shape[0]:
        raise JetDataError(f"{path}: {particles.shape[0]} jets in particle_features but {features.shape[0]} in "
                           "jet_features")
    for name, array in (("particle_features", particles), ("jet_features", features)):
        bad = ~np.isfinite(array)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise JetDataError(f"{path}: {name} holds {int(bad.sum())} NaN/inf values (first at index "
                               f"{tuple(int(i) for i in first)})")
    inferred = stored_type.decode() if isinstance(stored_type, bytes) else stored_type
    inferred = inferred or _type_from_filename(path)
    if jet_type is not None:
        check_jet_type(jet_type)
        if inferred is not None and inferred != jet_type:
            raise JetDataError(f"{path}: holds {inferred!r} jets, not {jet_type!r}")
        inferred = jet_type
    if inferred is None:
        raise JetDataError(f"{path}: cannot tell the jet type (no 'jet_type' attribute and the name is not "
                           f"one of {[t + '.hdf5' for t in JET_TYPES]}); pass jet_type=")
    if num_particles is not None:
        if not 0 < num_particles <= particles.shape[1]:
            raise JetDataError(f"{path}: holds {particles.shape[1]} particles per jet; cannot give "
                               f"num_particles={num_particles}")
        particles = particles[:, :num_particles]
        features = features.copy()
        features[:, 3] = np.minimum(features[:, 3], num_particles)
    check_jets(particles, features, path)
    return JetSet(inferred, particles, features)


PT_REL_TOLERANCE = 1e-3  # pt_rel may exceed 1 by float32 rounding (a constituent outweighing its jet
# needs others pointing more than 90 degrees away in phi, which an R = 0.8 jet cannot hold by much)


def check_jets(particles: np.ndarray, features: np.ndarray, path: str = "jets") -> None:
    """Raise :class:`JetDataError` naming ``path``, the dataset and the first bad jet when the
    (finite) arrays of the JetNet layout are physically invalid: a mask (column 3 of
    ``particle_features``) other than 0 or 1, a jet with no real particle, a real particle whose
    ``pt_rel`` is not in ``(0, 1 + PT_REL_TOLERANCE]``, or a jet whose pT (column 0 of
    ``jet_features``) is not positive or whose mass (column 2) is negative."""
    mask = particles[..., 3]
    checks = [
        ("particle_features", (mask != 0) & (mask != 1), "the mask (column 3) is neither 0 nor 1", mask),
        ("particle_features", (mask == 1) & ~(particles[..., 2] > 0), "a real particle (mask 1) has pt_rel "
         "(column 2) <= 0", particles[..., 2]),
        ("particle_features", (mask == 1) & (particles[..., 2] > 1 + PT_REL_TOLERANCE), "a real particle has "
         "pt_rel (column 2) > 1", particles[..., 2]),
    ]
    for name, bad, problem, values in checks:
        if bad.any():
            jet, particle = (int(i) for i in np.argwhere(bad)[0])
            raise JetDataError(f"{path}: dataset {name!r}: {problem} in {int(bad.any(axis=1).sum())} jet(s) (first: "
                               f"jet {jet}, particle {particle}, value {values[jet, particle]:g})")
    empty = ~np.any(mask == 1, axis=1)
    if empty.any():
        raise JetDataError(f"{path}: dataset 'particle_features': {int(empty.sum())} jet(s) have no real particle "
                           f"(mask all 0; first: jet {int(np.argmax(empty))})")
    for column, problem, bad in ((0, "the jet pT (column 0) is not positive", ~(features[:, 0] > 0)),
                                 (2, "the jet mass (column 2) is negative", features[:, 2] < 0)):
        if bad.any():
            jet = int(np.argmax(bad))
            raise JetDataError(f"{path}: dataset 'jet_features': {problem} in {int(bad.sum())} jet(s) (first: jet "
                               f"{jet}, value {features[jet, column]:g})")


def cached_generate(
    jet_type: str,
    num_jets: int,
    *,
    num_particles: int = 30,
    seed: int = 0,
    cache_dir: str | None = None,
    workers: int | None = None,
    settings: GeneratorSettings = GeneratorSettings(),
    progress: bool = True,
) -> JetSet:
    """:func:`generate` once, then reuse the file ``<cache_dir>/jetnet/<type>...h5`` (written atomically;
    :func:`fpcd.data.common.cached_generate`)."""
    check_jet_type(jet_type)
    path = common.cache_path("jetnet", f"{jet_type}{num_particles}_n{num_jets}_seed{seed}", settings, cache_dir)
    return common.cached_generate(
        path, lambda: generate(jet_type, num_jets, num_particles=num_particles, seed=seed, workers=workers,
                               settings=settings, progress=progress),
        lambda jets, p: save(jets, p, settings=settings, seed=seed), lambda p: load(p, jet_type=jet_type))


def main(argv: Sequence[str] | None = None) -> None:
    # Under ``python -m fpcd.data.jetnet`` this module is ``__main__``: build the settings from the importable
    # module, whose classes the worker processes can unpickle.
    from fpcd.data.jetnet import GeneratorSettings, generate, save  # noqa: F811
    parser = argparse.ArgumentParser(
        prog="python -m fpcd.data.jetnet",
        description="Generate JetNet-like jets with Pythia 8 + FastJet into an hdf5 file (JetNet layout).",
    )
    parser.add_argument("--jet_type", required=True, choices=JET_TYPES)
    parser.add_argument("--num_jets", type=int, required=True)
    parser.add_argument("--num_particles", type=int, default=30)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--mpi", choices=("on", "off"), default="on" if GeneratorSettings.mpi else "off",
                        help="multiparton interactions (underlying event)")
    parser.add_argument("--min_particle_pt", type=float, default=GeneratorSettings.min_particle_pt,
                        help="only particles above this pT [GeV] are clustered")
    args = parser.parse_args(argv)
    settings = GeneratorSettings(mpi=args.mpi == "on", min_particle_pt=args.min_particle_pt)
    jets = generate(args.jet_type, args.num_jets, num_particles=args.num_particles, seed=args.seed,
                    workers=args.workers, settings=settings)
    save(jets, args.out, settings=settings, seed=args.seed)
    mass = jets.jet_features[:, 2]
    print(f"wrote {len(jets)} {args.jet_type} jets to {args.out}: median mass {np.median(mass):.1f} GeV, "
          f"mean multiplicity {jets.jet_features[:, 3].mean():.1f}")


if __name__ == "__main__":
    main()
