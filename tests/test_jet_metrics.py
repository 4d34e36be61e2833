"""Jet metrics against closed forms and against the real jetnet package (stored reference values)."""

import os

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from fpcd.metrics import efp
from conftest import re_shape
from fpcd.metrics import jets as J

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "jetnet_reference.npz")
pytestmark = pytest.mark.filterwarnings("ignore:Recommended number")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _two_particle_jet(a=0.7, b=0.3, d_eta=0.3, d_phi=0.4):
    jet = np.zeros((1, 4, 4))
    jet[0, 0] = [0.1, 0.2, a, 1]
    jet[0, 1] = [0.1 + d_eta, 0.2 + d_phi, b, 1]
    return jet, np.hypot(d_eta, d_phi)


def test_mass_of_two_massless_particles():
    jet, _ = _two_particle_jet()
    a, b = 0.7, 0.3
    expected = np.sqrt(2 * a * b * (np.cosh(0.3) - np.cos(0.4)))
    assert J.jet_features(jet)["mass"][0] == pytest.approx(expected, rel=1e-12)
    assert J.jet_features(jet[0])["mass"] == pytest.approx(expected, rel=1e-12)


def test_efps_of_a_two_particle_jet_in_closed_form():
    a, b = 0.7, 0.3
    jet, theta = _two_particle_jet(a, b)
    values = J.efps(jet, efpset_args=[("d<=", 4)])[0]
    closed = {
        0: a + b,  # one vertex
        1: 2 * a * b * theta,  # one edge
        2: 2 * a * b * theta**2,
        4: 2 * a * b * theta**4,
        5: a * b * theta**2 * (a + b),  # wedge: sum_i z_i (sum_j z_j theta_ij)^2
        9: 0.0,  # triangle needs three distinct particles
        11: a * b * theta**3 * (a**2 + b**2),  # star with three edges
        13: 2 * a**2 * b**2 * theta**3,  # path of four vertices
        21: (2 * a * b * theta) ** 2,  # two disjoint edges = product
        35: (2 * a * b * theta) ** 4,
    }
    for index, expected in closed.items():
        assert values[index] == pytest.approx(expected, rel=2e-5, abs=1e-9), index


def test_efp_selections_match_energyflow_counts():
    assert len(efp.select(("d<=", 4))) == 36
    assert len(efp.select(("d<=", 4), ("p==", 1))) == 21
    assert efp.select(("n==", 4), ("d==", 4), ("p==", 1)) == [12, 14, 15, 16, 17]
    assert [len(efp.select(("d==", d))) for d in range(5)] == [1, 1, 3, 8, 23]
    assert efp.select(4) == efp.select("d<=4")
    with pytest.raises(ValueError, match="up to degree 4"):
        efp.select(("n==", 4))
    with pytest.raises(ValueError, match="unknown EFP selection field"):
        efp.select(("q==", 1), ("d<=", 2))


def test_padding_and_mask_do_not_change_efps_or_masses():
    rng = np.random.default_rng(0)
    jets = np.zeros((20, 10, 4))
    jets[:, :6, :3] = rng.normal(0, 0.2, (20, 6, 3))
    jets[:, :6, 2] = np.abs(jets[:, :6, 2])
    jets[:, :6, 3] = 1
    garbage = jets.copy()
    garbage[:, 6:, :3] = 5.0  # masked out by the 4th column
    np.testing.assert_allclose(J.efps(garbage, efpset_args=[("d<=", 4)]), J.efps(jets[:, :6], efpset_args=[("d<=", 4)]),
                               rtol=1e-5)
    np.testing.assert_allclose(J.jet_features(garbage)["mass"], J.jet_features(jets[:, :6, :3])["mass"])
    w_full = J.w1p(garbage, jets, num_eval_samples=20, num_batches=1, return_std=False)
    np.testing.assert_allclose(w_full, 0.0, atol=1e-12)


@pytest.mark.parametrize("other", ["t_b", "q"])
def test_agrees_with_the_jetnet_package(ref, other):
    """Values of jetnet 0.2.5 + energyflow 1.4.0 on the same jets (tests/fixtures/make_jetnet_reference.py)."""
    a, b = ref["t_a"], ref[other]
    for name in ("t_a", other):
        np.testing.assert_allclose(J.get_fpd_kpd_jet_features(ref[name]), ref[f"ref_efps36_{name}"], rtol=1e-4,
                                   atol=1e-12)
        np.testing.assert_allclose(J.jet_features(ref[name])["mass"], ref[f"ref_mass_{name}"], rtol=1e-9)
    # Same draws as jetnet (seed 42), so values and errors agree to rounding: measured worst relative
    # differences w1m 5e-14, w1p 6e-11, w1efp 5e-7, fpd 9e-7, kpd 1e-7.
    settings = {"num_eval_samples": len(a), "num_batches": 5, "seed": 42}
    np.testing.assert_allclose(J.w1m(a, b, **settings), ref[f"ref_w1m_{other}"][:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.stack(J.w1p(a, b, **settings)), ref[f"ref_w1p_{other}"], rtol=1e-5)
    np.testing.assert_allclose(np.stack(J.w1efp(a, b, **settings)), ref[f"ref_w1efp_{other}"], rtol=1e-5)
    fa, fb = J.get_fpd_kpd_jet_features(a), J.get_fpd_kpd_jet_features(b)
    fpd = J.fpd(fa, fb, min_samples=200, max_samples=len(a), num_batches=10, num_points=5, seed=42)
    kpd = J.kpd(fa, fb, batch_size=200, num_batches=10, seed=42)
    np.testing.assert_allclose(fpd, ref[f"ref_fpd_{other}"], rtol=1e-5)  # (value, error)
    np.testing.assert_allclose(kpd, ref[f"ref_kpd_{other}"], rtol=1e-5)


def test_exact_mode_uses_full_samples_without_resampling(ref):
    a, b = ref["t_a"], ref["q"]
    exact = J.w1m(a, b, num_eval_samples=len(a), num_batches=1, seed=1)
    assert exact == J.w1m(a, b, num_eval_samples=len(a), num_batches=1, seed=2)
    expected = wasserstein_distance(J.jet_features(a)["mass"], J.jet_features(b)["mass"])
    assert exact[0] == pytest.approx(expected, rel=1e-12) and exact[1] == 0.0
    p = J.w1p(a, b, num_eval_samples=len(a), num_batches=1, return_std=False)
    real_a, real_b = a[a[..., 3] > 0.5].astype(np.float64), b[b[..., 3] > 0.5].astype(np.float64)
    np.testing.assert_allclose(p, [wasserstein_distance(real_a[:, i], real_b[:, i]) for i in range(3)], rtol=1e-9)


def test_subsampling_is_reproducible_per_seed(ref):
    a, b = ref["t_a"], ref["q"]
    kwargs = {"num_eval_samples": 300, "num_batches": 3}
    assert J.w1m(a, b, seed=5, **kwargs) == J.w1m(a, b, seed=5, **kwargs)
    assert J.w1m(a, b, seed=5, **kwargs) != J.w1m(a, b, seed=6, **kwargs)
    assert J.w1m(a, b, seed=5, return_std=False, **kwargs) == J.w1m(a, b, seed=5, **kwargs)[0]


def test_one_dimensional_w1_of_shifted_samples():
    """W1 between a distribution and its copy shifted by s is s: check through w1p's eta_rel."""
    rng = np.random.default_rng(1)
    jets = np.zeros((500, 5, 4))
    jets[..., 0] = rng.normal(size=(500, 5))
    jets[..., 1] = 0.1
    jets[..., 2] = 0.2
    jets[..., 3] = 1
    shifted = jets.copy()
    shifted[..., 0] += 0.25
    w = J.w1p(jets, shifted, num_eval_samples=500, num_batches=1, return_std=False)
    assert w[0] == pytest.approx(0.25, rel=1e-9) and w[1] == 0.0 and w[2] == 0.0


def test_frechet_distance_of_two_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0, 0.25]), np.diag([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert J.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]  # invariant under rotation
    assert J.frechet_distance(rot @ mu1, rot @ s1 @ rot.T, rot @ mu2, rot @ s2 @ rot.T) == pytest.approx(expected)


def test_fpd_and_kpd_separate_different_samples(ref):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 5))
    y = rng.normal(size=(3000, 5))
    z = rng.normal(size=(3000, 5)) * 1.3 + 0.3
    kw = {"min_samples": 500, "max_samples": 3000, "num_batches": 5, "num_points": 4}
    same, shifted = J.fpd(x, y, **kw)[0], J.fpd(x, z, **kw)[0]
    assert same < 0.01 < shifted
    kpd_same, kpd_shifted = J.kpd(x, y, batch_size=500)[0], J.kpd(x, z, batch_size=500)[0]
    assert abs(kpd_same) < 0.01 < kpd_shifted


def test_truth_floor_is_below_a_real_difference(ref):
    truth = np.concatenate([ref["t_a"], ref["t_b"]])
    floor = J.truth_floor(J.w1m, truth, num_eval_samples=400, num_batches=1)
    assert floor[0] < J.w1m(ref["t_a"], ref["q"], num_eval_samples=400, num_batches=1)[0] / 5
    explicit = J.truth_floor(J.w1m, ref["t_a"], ref["t_b"], num_eval_samples=400, num_batches=1)
    assert explicit == J.w1m(ref["t_a"], ref["t_b"], num_eval_samples=400, num_batches=1)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        J.w1m(np.zeros((3, 4, 2)), np.zeros((3, 4, 2)))


def test_fast_w1_equals_scipy():
    from scipy.stats import wasserstein_distance as scipy_w1

    from fpcd.metrics import wasserstein_1d

    rng = np.random.default_rng(3)
    for n, m in ((1000, 1000), (700, 1300), (5, 3)):
        u, v = rng.normal(size=n), rng.gamma(2.0, size=m)
        assert wasserstein_1d(u, v) == pytest.approx(scipy_w1(u, v), rel=1e-10)
    ties = np.array([0.0, 0.0, 1.0, 1.0])
    assert wasserstein_1d(ties, ties) == 0.0
    assert wasserstein_1d([0.0], [2.5]) == pytest.approx(2.5)


JETS = np.concatenate([np.random.default_rng(0).normal(0, 0.1, (6, 5, 2)), np.full((6, 5, 1), 0.2),
                       np.ones((6, 5, 1))], axis=2)
W1_KW = {"num_eval_samples": 6, "num_batches": 1}
JET_METRICS = {
    "w1m": lambda a, b: J.w1m(a, b, **W1_KW),
    "w1p": lambda a, b: J.w1p(a, b, **W1_KW),
    "w1efp": lambda a, b: J.w1efp(a, b, **W1_KW),
}


@pytest.mark.parametrize("metric", sorted(JET_METRICS))
@pytest.mark.parametrize("bad", [JETS[0], JETS[:0]], ids=["one jet 2-d", "empty"])
def test_jet_w1_metrics_name_the_expected_shape(metric, bad):
    with pytest.raises(ValueError, match=rf"jets2 must have shape \(N, P, 3 or 4\).*got shape {re_shape(bad.shape)}"):
        JET_METRICS[metric](JETS, bad)


@pytest.mark.parametrize("bad", [JETS[0], JETS[:0]], ids=["one jet 2-d", "empty"])
def test_fpd_kpd_features_name_the_expected_shape(bad):
    with pytest.raises(ValueError, match=rf"jets must have shape \(N, P, 3 or 4\).*got shape {re_shape(bad.shape)}"):
        J.get_fpd_kpd_jet_features(bad)


FEATURES = np.random.default_rng(1).normal(size=(8, 3))


@pytest.mark.parametrize("metric", ["fpd", "kpd"])
@pytest.mark.parametrize("bad", [FEATURES[:0], FEATURES[0], FEATURES[:, :, None]], ids=["empty", "1-d", "3-d"])
def test_fpd_kpd_name_the_expected_shape(metric, bad):
    call = {"fpd": lambda a, b: J.fpd(a, b, min_samples=4, max_samples=8, num_batches=1, num_points=2),
            "kpd": lambda a, b: J.kpd(a, b, num_batches=1, batch_size=4)}[metric]
    with pytest.raises(ValueError, match=rf"gen_features must have shape \(N, F\).*got shape {re_shape(bad.shape)}"):
        call(FEATURES, bad)


@pytest.mark.parametrize("metric", ["w1m", "w1p", "w1efp", "get_fpd_kpd_jet_features", "fpd", "kpd"])
def test_jet_metrics_refuse_non_finite_input(metric):
    jets = JETS.copy()
    jets[2, 1, 0] = np.nan
    features = FEATURES.copy()
    features[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        if metric in JET_METRICS:
            JET_METRICS[metric](JETS, jets)
        elif metric == "get_fpd_kpd_jet_features":
            J.get_fpd_kpd_jet_features(jets)
        elif metric == "fpd":
            J.fpd(FEATURES, features, min_samples=4, max_samples=8, num_batches=1, num_points=2)
        else:
            J.kpd(FEATURES, features, num_batches=1, batch_size=4)
