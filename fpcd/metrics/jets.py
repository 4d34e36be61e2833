"""Jet metrics: a drop-in replacement for ``jetnet.evaluation`` (W1M, W1P, W1EFP, FPD, KPD) and
``jetnet.utils.efps``/``jet_features``, without PyTorch, numba or energyflow.

Names, arguments, defaults and return values follow jetnet 0.2.5, so code written for jetnet runs
unchanged. Differences, all deliberate:

* Every random subsampling takes an explicit ``seed`` (default 42), so every figure is
  reproducible. With ``num_batches=1`` and ``num_eval_samples`` equal to a sample's size, that
  sample is used as it is (no resampling), so the figure is exact.
* Particle arrays are ``(N, P, 3 or 4)`` = (eta_rel, phi_rel, pt_rel[, mask]): a 4th column is read
  as the mask (jetnet would read it as a particle mass in ``w1m``). Masked particles count as absent.
* ``w1m(..., return_std=False)`` returns the mean alone (jetnet 0.2.5 returns ``(mean, mean)``
  there through an operator-precedence slip).

Mass for W1M is that of the sum of the constituents taken as massless four-vectors (with relative
inputs it is m / pT_jet). EFPs are computed natively (:mod:`fpcd.metrics.efp`).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit
from scipy.stats import iqr

from fpcd.metrics import efp as _efp
from fpcd.metrics.distances import wasserstein_1d as wasserstein_distance

RECOMMENDED_SAMPLES = 50_000


def _as_numpy(*arrays):
    out = []
    for a in arrays:
        if hasattr(a, "detach"):  # a torch tensor, if a user passes one
            a = a.detach().cpu().numpy()
        out.append(np.asarray(a))
    return out[0] if len(out) == 1 else out


def _split_mask(jets, mask=None):
    """``(features (N, P, 3), mask (N, P) bool)``: the 4th column (if any) or ``mask`` as the mask."""
    jets = np.asarray(jets, np.float64)
    if jets.ndim == 2:
        jets = jets[None]
    if jets.ndim != 3 or jets.shape[2] < 3:
        raise ValueError(f"jets must have shape (N, P, 3 or 4) = (eta_rel, phi_rel, pt_rel[, mask]), got {jets.shape}")
    if mask is not None:
        real = np.asarray(mask).reshape(jets.shape[0], jets.shape[1]).astype(bool)
    elif jets.shape[2] >= 4:
        real = jets[:, :, 3] > 0.5
    else:
        real = np.ones(jets.shape[:2], bool)
    return jets[:, :, :3], real


def _checked_jets(name: str, jets) -> np.ndarray:
    """``jets`` as an array after checking it is a non-empty, finite ``(N, P, 3 or 4)`` sample;
    ValueError naming ``name`` otherwise."""
    jets = np.asarray(_as_numpy(jets))
    if jets.ndim != 3 or jets.shape[2] < 3 or jets.shape[0] == 0 or jets.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, P, 3 or 4) = (eta_rel, phi_rel, pt_rel[, mask]) with N >= 1 jets "
                         f"of P >= 1 particles, got shape {jets.shape}")
    if not np.all(np.isfinite(jets)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(jets)))} NaN/inf values; drop non-finite jets first")
    return jets


def _checked_features(name: str, features, minimum: int = 2) -> np.ndarray:
    """``features`` as float64 after checking it is a finite ``(N, F)`` array with ``N >= minimum``
    and ``F >= 1``; ValueError naming ``name`` otherwise."""
    features = np.asarray(_as_numpy(features), np.float64)
    if features.ndim != 2 or features.shape[0] < minimum or features.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, F) with N >= {minimum} jets and F >= 1 features, got shape "
                         f"{features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(features)))} NaN/inf values")
    return features


def _checked_pair(names, x, y):
    x, y = _checked_features(names[0], x), _checked_features(names[1], y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} has {x.shape[1]} features per jet but {names[1]} has {y.shape[1]}")
    return x, y


def _positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int (Python or NumPy integer, or 0-d integer array; not bool) that is at least
    ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        value = None
    elif isinstance(value, np.ndarray) and value.shape == () and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _recommend(*sizes, what="W1 estimation"):
    if min(sizes) < RECOMMENDED_SAMPLES:
        warnings.warn(f"Recommended number of jets for {what} is {RECOMMENDED_SAMPLES:,}", RuntimeWarning, stacklevel=3)


def _draws(rng, size, num_eval_samples, num_batches):
    """Index arrays of each batch: the whole sample in order when it is used as it is."""
    if num_batches == 1 and num_eval_samples == size:
        return [np.arange(size)]
    return [rng.choice(size, size=num_eval_samples) for _ in range(num_batches)]


def _paired_draws(n1, n2, num_eval_samples, num_batches, seed):
    rng = np.random.default_rng(seed)
    if num_batches == 1 and (num_eval_samples == n1 or num_eval_samples == n2):
        first = _draws(rng, n1, num_eval_samples, 1)
        return list(zip(first, _draws(rng, n2, num_eval_samples, 1)))
    pairs = []
    for _ in range(num_batches):
        pairs.append((rng.choice(n1, size=num_eval_samples), rng.choice(n2, size=num_eval_samples)))
    return pairs


def _sample_counts(num_eval_samples, num_batches):
    return _positive_int("num_eval_samples", num_eval_samples), _positive_int("num_batches", num_batches)


def jet_features(jets, mask=None) -> dict:
    """Jet ``mass``, ``pt`` and ``eta`` from summing constituents as massless four-vectors.

    Args:
      jets: ``(N, P, 3 or 4)`` or one jet ``(P, 3 or 4)`` = (eta, phi, pt[, mask]).

    Returns:
      dict of arrays ``(N,)`` (floats for one jet), like ``jetnet.utils.jet_features``.
    """
    single = np.asarray(jets).ndim == 2
    feats, real = _split_mask(jets, mask)
    eta, phi, pt = feats[..., 0], feats[..., 1], feats[..., 2] * real
    px, py = (pt * np.cos(phi)).sum(1), (pt * np.sin(phi)).sum(1)
    pz, e = (pt * np.sinh(eta)).sum(1), (pt * np.cosh(eta)).sum(1)
    jet_pt = np.hypot(px, py)
    mass = np.sqrt(np.maximum(e**2 - px**2 - py**2 - pz**2, 0.0))
    jet_eta = np.arcsinh(np.divide(pz, jet_pt, out=np.zeros_like(pz), where=jet_pt > 0))
    out = {"mass": mass, "pt": jet_pt, "eta": jet_eta}
    return {k: float(v[0]) for k, v in out.items()} if single else out


def efps(jets, use_particle_masses: bool = False, efpset_args: list | None = None, efp_jobs: int | None = None,
         *, beta: float = 1.0):
    """Energy flow polynomials of jets, as ``jetnet.utils.efps`` (energyflow's ``'hadr'`` measure,
    ``beta=1``, unnormalised ``z_i = pT_i``, ``coords='ptyphim'``).

    Args:
      jets: ``(N, P, 3 or 4)`` or ``(P, 3 or 4)`` = (eta, phi, pt[, mask]).
      use_particle_masses: accepted for compatibility; the hadronic measure does not use masses.
      efpset_args: energyflow selection (default: the 5 prime EFPs with n = 4, d = 4).
      efp_jobs: accepted for compatibility (the computation is vectorised, not multiprocess).

    Returns:
      ``(N, num_efps)`` (or ``(num_efps,)`` for one jet), columns in energyflow's order.
    """
    del use_particle_masses, efp_jobs
    if efpset_args is None:
        efpset_args = [("n==", 4), ("d==", 4), ("p==", 1)]
    single = np.asarray(jets).ndim == 2
    feats, real = _split_mask(_as_numpy(jets))
    values = _efp.compute(feats[..., 2] * real, feats[..., 0], feats[..., 1], _efp.select(*efpset_args), beta=beta)
    return values[0] if single else values


def w1m(jets1, jets2, num_eval_samples: int = 50_000, num_batches: int = 5, return_std: bool = True, *,
        seed: int = 42):
    """W1 between the jet-mass distributions of two jet samples (as ``jetnet.evaluation.w1m``).

    Returns ``(mean, std)`` over the batches (``mean`` alone with ``return_std=False``).

    Raises:
      ValueError: ``jets1``/``jets2`` not non-empty ``(N, P, 3 or 4)`` arrays or holding NaN/inf,
        ``num_eval_samples``/``num_batches`` not positive integers (each named).
    """
    jets1, jets2 = _checked_jets("jets1", jets1), _checked_jets("jets2", jets2)
    num_eval_samples, num_batches = _sample_counts(num_eval_samples, num_batches)
    _recommend(len(jets1), len(jets2))
    masses1, masses2 = jet_features(jets1)["mass"], jet_features(jets2)["mass"]
    w1s = [wasserstein_distance(masses1[a], masses2[b])
           for a, b in _paired_draws(len(masses1), len(masses2), num_eval_samples, num_batches, seed)]
    return (float(np.mean(w1s)), float(np.std(w1s))) if return_std else float(np.mean(w1s))


def w1p(jets1, jets2, mask1=None, mask2=None, exclude_zeros: bool = True, num_particle_features: int = 0,
        num_eval_samples: int = 50_000, num_batches: int = 5, return_std: bool = True, *, seed: int = 42):
    """Per-feature W1 between the pooled real particles of two jet samples (``jetnet.evaluation.w1p``).

    Args:
      mask1, mask2: optional ``(N, P)`` masks; otherwise a 4th feature column is the mask.
      exclude_zeros: also drop particles whose features are all exactly zero (padding).
      num_particle_features: W1 of the first this many features (0: eta_rel, phi_rel, pt_rel).

    Returns:
      ``(means, stds)`` arrays over the features (``means`` alone with ``return_std=False``).

    Raises:
      ValueError: ``jets1``/``jets2`` not non-empty ``(N, P, 3 or 4)`` arrays or holding NaN/inf,
        a mask not of shape ``(N, P)``, ``num_eval_samples``/``num_batches`` not positive integers
        (each named).
    """
    jets1, jets2 = _checked_jets("jets1", jets1), _checked_jets("jets2", jets2)
    for name, mask, jets in (("mask1", mask1, jets1), ("mask2", mask2, jets2)):
        if mask is not None and np.shape(_as_numpy(mask)) != jets.shape[:2]:
            raise ValueError(f"{name} must have shape {jets.shape[:2]} (N, P) like its jets, got shape "
                             f"{np.shape(_as_numpy(mask))}")
    num_eval_samples, num_batches = _sample_counts(num_eval_samples, num_batches)
    _recommend(len(jets1), len(jets2))
    feats1, real1 = _split_mask(jets1, None if mask1 is None else _as_numpy(mask1))
    feats2, real2 = _split_mask(jets2, None if mask2 is None else _as_numpy(mask2))
    k = num_particle_features if num_particle_features > 0 else 3
    if k > 3:
        raise ValueError(f"num_particle_features={k} but jets have 3 particle features")
    if exclude_zeros:
        real1 &= np.linalg.norm(feats1[:, :, :k], axis=2) != 0
        real2 &= np.linalg.norm(feats2[:, :, :k], axis=2) != 0
    w1s = []
    for a, b in _paired_draws(len(feats1), len(feats2), num_eval_samples, num_batches, seed):
        parts1 = feats1[a][real1[a]][:, :k]
        parts2 = feats2[b][real2[b]][:, :k]
        if len(parts1) == 0 or len(parts2) == 0:
            w1s.append([np.inf] * k)
        else:
            w1s.append([wasserstein_distance(parts1[:, i], parts2[:, i]) for i in range(k)])
    means, stds = np.mean(w1s, axis=0), np.std(w1s, axis=0)
    return (means, stds) if return_std else means


def w1efp(jets1, jets2, use_particle_masses: bool = False, efpset_args: list | None = None,
          num_eval_samples: int = 50_000, num_batches: int = 5, return_std: bool = True,
          efp_jobs: int | None = None, *, seed: int = 42):
    """Per-EFP W1 between two jet samples (default: the 5 prime n=4, d=4 EFPs), as
    ``jetnet.evaluation.w1efp``. Returns ``(means, stds)`` arrays over the EFPs.

    Raises:
      ValueError: ``jets1``/``jets2`` not non-empty ``(N, P, 3 or 4)`` arrays or holding NaN/inf,
        ``num_eval_samples``/``num_batches`` not positive integers (each named).
    """
    jets1, jets2 = _checked_jets("jets1", jets1), _checked_jets("jets2", jets2)
    num_eval_samples, num_batches = _sample_counts(num_eval_samples, num_batches)
    _recommend(len(jets1), len(jets2))
    efps1 = efps(jets1, efpset_args=efpset_args)
    efps2 = efps(jets2, efpset_args=efpset_args)
    w1s = [[wasserstein_distance(efps1[a, i], efps2[b, i]) for i in range(efps1.shape[1])]
           for a, b in _paired_draws(len(efps1), len(efps2), num_eval_samples, num_batches, seed)]
    means, stds = np.mean(w1s, axis=0), np.std(w1s, axis=0)
    return (means, stds) if return_std else means


def get_fpd_kpd_jet_features(jets, efp_jobs: int | None = None) -> np.ndarray:
    """The 36 EFPs of degree <= 4 per jet, the recommended FPD/KPD features: ``(N, 36)``.

    Raises:
      ValueError: ``jets`` not a non-empty ``(N, P, 3 or 4)`` array, or holding NaN/inf.
    """
    del efp_jobs
    return efps(_checked_jets("jets", jets), efpset_args=[("d<=", 4)])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    if not (np.all(np.isfinite(sigma1)) and np.all(np.isfinite(sigma2)) and np.all(np.isfinite(diff))):
        return float("inf")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _normalise_features(x, y=None):
    maxes = np.max(np.abs(x), axis=0)
    maxes[maxes == 0] = 1.0
    return (x / maxes, y / maxes) if y is not None else x / maxes


def fpd(real_features, gen_features, min_samples: int = 20_000, max_samples: int = 50_000, num_batches: int = 20,
        num_points: int = 10, normalise: bool = True, seed: int = 42):
    """Fréchet physics distance (arXiv 2211.10295) and its error, as ``jetnet.evaluation.fpd``.

    The Fréchet distance of Gaussian fits is averaged over ``num_batches`` draws at ``num_points``
    batch sizes equally spaced in 1/N between ``min_samples`` and ``max_samples``; a linear fit in
    1/N extrapolates to N -> infinity. Returns ``(intercept, its fit error)``.

    Raises:
      ValueError: ``real_features``/``gen_features`` not finite ``(N, F)`` arrays of at least 2
        jets with the same ``F``, or ``min_samples`` (>= 2), ``max_samples``, ``num_batches``,
        ``num_points`` not positive integers (each named).
    """
    x, y = _checked_pair(("real_features", "gen_features"), real_features, gen_features)
    min_samples = _positive_int("min_samples", min_samples, 2)
    max_samples = _positive_int("max_samples", max_samples, 2)
    num_batches, num_points = _positive_int("num_batches", num_batches), _positive_int("num_points", num_points)
    _recommend(len(x), len(y), what="FPD estimation")
    if normalise:
        x, y = _normalise_features(x, y)
    batches = (1 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype("int32")
    rng = np.random.default_rng(seed)
    values = []
    for batch_size in batches:
        points = []
        for _ in range(num_batches):
            a, b = x[rng.choice(len(x), size=batch_size)], y[rng.choice(len(y), size=batch_size)]
            points.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
        values.append(np.mean(points))
    if not np.all(np.isfinite(values)):
        return float("inf"), float("nan")
    params, covs = curve_fit(lambda n_inv, c, m: c + m * n_inv, 1 / batches, values,
                             bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(covs)[0]))


def mmd_poly_unbiased(x, y, degree: int = 4) -> float:
    """Unbiased MMD^2 with the kernel ``(x.y / d + 1)^degree``."""
    gamma = 1.0 / x.shape[-1]
    kxx = (x @ x.T * gamma + 1.0) ** degree
    kyy = (y @ y.T * gamma + 1.0) ** degree
    kxy = (x @ y.T * gamma + 1.0) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kpd(real_features, gen_features, num_batches: int = 10, batch_size: int = 5_000, normalise: bool = True,
        seed: int = 42, num_threads: int | None = None):
    """Kernel physics distance (arXiv 2211.10295), as ``jetnet.evaluation.kpd``: the median over
    ``num_batches`` batches of the unbiased polynomial-kernel MMD^2, and half its 16-84% range.

    Raises:
      ValueError: ``real_features``/``gen_features`` not finite ``(N, F)`` arrays of at least 2
        jets with the same ``F``, or ``num_batches`` (>= 1), ``batch_size`` (>= 2) not integers
        (each named).
    """
    del num_threads
    x, y = _checked_pair(("real_features", "gen_features"), real_features, gen_features)
    num_batches, batch_size = _positive_int("num_batches", num_batches), _positive_int("batch_size", batch_size, 2)
    if normalise:
        x, y = _normalise_features(x, y)
    values = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        a, b = x[rng.choice(len(x), size=batch_size)], y[rng.choice(len(y), size=batch_size)]
        values.append(mmd_poly_unbiased(a, b))
    return float(np.median(values)), float(iqr(values, rng=(16.275, 83.725)) / 2)


def truth_floor(metric, truth, truth_b=None, *, seed: int = 0, **kwargs):
    """The value of ``metric`` between two independent truth samples: the floor a model is judged by.

    Args:
      metric: one of :func:`w1m`, :func:`w1p`, :func:`w1efp` (jets in) or :func:`fpd`,
        :func:`kpd` (features in).
      truth: truth sample; without ``truth_b`` it is split at random into two halves.
      truth_b: a second, independent truth sample.
      seed: seed of the split.
      kwargs: passed to ``metric`` (e.g. ``num_eval_samples``; compare at the sample size the
        model is judged at, as finite-sample distances shrink with size).
    """
    truth = _as_numpy(truth)
    if truth_b is None:
        order = np.random.default_rng(seed).permutation(len(truth))
        half = len(truth) // 2
        truth, truth_b = truth[order[:half]], truth[order[half: 2 * half]]
    return metric(truth, _as_numpy(truth_b), **kwargs)
