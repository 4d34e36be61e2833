"""Anomaly detection: the ROC / AUC / SIC metrics on hand-computed cases, and the anomaly experiment's
tiny preset end to end (scores are the two stages' probability-flow likelihoods; metrics.json is
what its scores file gives)."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fpcd.config import ConfigError
from fpcd.experiments.anomaly import AnomalyExperiment, anomaly_score
from fpcd.likelihood import log_likelihood
from fpcd.metrics.anomaly import auc, roc_curve, sic
from fpcd.nets import score_fn_from
from fpcd.parallel import data_mesh
from fpcd.runner import read_samples, restore_models, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import anomaly as anomaly_config  # noqa: E402  (experiments/anomaly.py)


# --- metrics ---------------------------------------------------------------------------------------


def test_roc_curve_of_a_hand_counted_case():
    # Cuts at 0.8, 0.4, 0.35, 0.1 pass (signal, background) = (1, 0), (1, 1), (2, 1), (2, 2).
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_tied_scores_move_together_and_count_half():
    # Signal {1, 2} vs background {1, 0}: pairs won 1 + 1 + 1, tied 1 -> (3 + 0.5) / 4.
    labels, scores = [0, 1, 0, 1], [1.0, 1.0, 0.0, 2.0]
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 2.0, 1.0, 0.0])
    assert auc(labels, scores) == 0.875


def test_auc_is_the_mann_whitney_probability():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300) + 2 * labels  # many ties
    signal, background = scores[labels == 1], scores[labels == 0]
    wins = (signal[:, None] > background[None, :]).mean() + 0.5 * (signal[:, None] == background[None, :]).mean()
    assert auc(labels, scores) == pytest.approx(wins, rel=1e-12)
    assert auc(labels, -scores) == pytest.approx(1.0 - wins, rel=1e-12)


def test_sic_maximum_and_value_at_a_signal_efficiency():
    # Background 0..3, signal 0.5..3.5 interleaved: (fpr, tpr) = (0,.25) (.25,.25) (.25,.5) (.5,.5) ...
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0, 1, 2, 3, 0.5, 1.5, 2.5, 3.5]
    result = sic(labels, scores, signal_efficiency=0.4, min_background=1)
    assert result["max"] == pytest.approx(1.0 / np.sqrt(0.75), rel=1e-12)  # tpr 1 at fpr 0.75
    assert result["tpr_at_max"] == 1.0
    assert result["at_efficiency"] == pytest.approx(0.4 / np.sqrt(0.25), rel=1e-12)
    # At tpr 0.25 no background passes: the FPR is floored at one background event (1/4).
    floored = sic(labels, scores, signal_efficiency=0.25, min_background=1)
    assert floored["at_efficiency"] == pytest.approx(0.5) and floored["at_efficiency_is_lower_bound"]
    assert not result["at_efficiency_is_lower_bound"]
    # min_background=2 excludes the cuts passing one background event (fpr 0.25).
    assert sic(labels, scores, signal_efficiency=0.4, min_background=2)["max"] == pytest.approx(1.0 / np.sqrt(0.75))
    assert sic(labels, scores, min_background=4)["max"] == 1.0  # only fpr = 1 is left


def test_sic_interpolates_the_fpr_on_a_tied_segment():
    # Signal {1, 2}, background {0, 0, 1, 1}: the tie at 1 joins (0, .5) and (.5, 1); at tpr .9 fpr = .4.
    result = sic([0, 0, 0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0, 1.0, 2.0], signal_efficiency=0.9, min_background=1)
    assert result["at_efficiency"] == pytest.approx(0.9 / np.sqrt(0.4), rel=1e-12)


@pytest.mark.parametrize("labels, scores, match", [
    ([0, 0, 0], [1.0, 2.0, 3.0], "both classes"),
    ([0, 1, 2], [1.0, 2.0, 3.0], "0 \\(background\\) or 1"),
    ([0, 1], [1.0, np.nan], "non-finite"),
    ([0, 1, 1], [1.0, 2.0], "one length"),
])
def test_bad_metric_input_is_refused(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auc(labels, scores)


# --- the experiment --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory, tiny_jet_cache):
    """The tiny preset, in-process, on the tiny jets tests' cache."""
    workdir = tmp_path_factory.mktemp("anomaly_tiny")
    cfg = anomaly_config.get_config("tiny")
    cfg.data.cache_dir = str(tiny_jet_cache)
    experiment = AnomalyExperiment(cfg, progress=False)
    metrics = train_and_evaluate(experiment, str(workdir), "all", data_mesh())
    return workdir, cfg, experiment, metrics


def _labels(arrays, types, background, anomaly):
    type_of = np.asarray(types)[arrays["type_index"]]
    keep = np.isin(type_of, background) | (type_of == anomaly)
    return keep, (type_of[keep] == anomaly).astype(int)


@pytest.mark.e2e
def test_metrics_json_is_what_the_scores_file_gives(anomaly_run):
    workdir, cfg, _, metrics = anomaly_run
    on_disk = json.loads((workdir / "metrics.json").read_text())
    assert set(on_disk["backgrounds"]) == set(metrics["backgrounds"]) == set(cfg.backgrounds)
    types = list(cfg.data.jet_types)
    for name, background in cfg.backgrounds.items():
        assert (workdir / f"anomaly_scores_{name}.png").stat().st_size > 10_000
        assert (workdir / f"anomaly_roc_{name}.png").stat().st_size > 10_000
        runs = read_samples(str(workdir / f"scores_{name}.h5"))
        arrays = runs["hutchinson"].arrays
        n = cfg.sampling.num_samples
        np.testing.assert_array_equal(arrays["type_index"], np.repeat(np.arange(len(types)), n))
        np.testing.assert_allclose(arrays["score"], anomaly_score(arrays["log_p_jet"], arrays["log_p_particles"],
                                                                  arrays["num_particles"]), rtol=1e-12)
        row = on_disk["backgrounds"][name]
        anomalies = [t for t in types if t not in background]
        assert sorted(row["anomalies"]) == sorted(anomalies)
        for anomaly in anomalies:
            keep, labels = _labels(arrays, types, background, anomaly)
            got = row["anomalies"][anomaly]
            assert got["likelihood"]["auc"] == pytest.approx(auc(labels, arrays["score"][keep]), rel=1e-12)
            expected_sic = sic(labels, arrays["score"][keep], signal_efficiency=0.1, min_background=10)
            assert got["likelihood"]["sic_max"] == pytest.approx(expected_sic["max"], rel=1e-12)
            assert got["likelihood"]["sic_at_efficiency"] == pytest.approx(expected_sic["at_efficiency"], rel=1e-12)
            mass_auc = auc(labels, arrays["mass"][keep])
            assert got["mass"]["auc"] == pytest.approx(max(mass_auc, 1 - mass_auc), rel=1e-12)
            mult_auc = auc(labels, arrays["num_particles"][keep])
            assert got["multiplicity"]["auc"] == pytest.approx(max(mult_auc, 1 - mult_auc), rel=1e-12)
        for index, jet_type in enumerate(types):
            chosen = arrays["type_index"] == index
            assert row["log_likelihood"][jet_type]["mean_log_p"] == pytest.approx(
                np.mean(arrays["log_p_jet"][chosen] + arrays["log_p_particles"][chosen]), rel=1e-12)
        cost = row["cost"]["hutchinson"]
        assert cost["nfe"] > 6 and cost["nfe_jet_stage"] > 6 and cost["ms_per_jet"] > 0


@pytest.mark.e2e
def test_scores_are_the_two_stage_likelihoods_of_the_held_out_jets(anomaly_run):
    """The exact run's values equal a direct log_likelihood of the restored models on the same jets
    (one batch), the multiplicity is the jets' own and the mass their physical mass."""
    workdir, cfg, experiment, _ = anomaly_run
    data = experiment.load_data()
    models = restore_models(experiment, experiment.stages(data), data_mesh(), str(workdir))
    name = next(iter(cfg.backgrounds))
    arrays = read_samples(str(workdir / f"scores_{name}.h5"))["exact"].arrays
    k = cfg.sampling.runs.exact.num_jets
    background = data.backgrounds[name]
    particles, mask, jet = (np.concatenate([background.scored[t][i][:k] for t in data.types]) for i in range(3))
    np.testing.assert_array_equal(arrays["num_particles"], mask.sum(axis=1))
    masses = np.concatenate([data.scored[t].jet_features[:k, 2] for t in data.types])
    np.testing.assert_array_equal(arrays["mass"], masses)
    tol = {"rtol": cfg.sampling.runs.exact.rtol, "atol": cfg.sampling.runs.exact.atol}
    jet_fn = score_fn_from(models[f"jet_{name}"], experiment.sde, prediction=cfg.train_global.prediction)
    log_p_jet, _ = log_likelihood(jet_fn, experiment.sde, jnp.asarray(jet), **tol)
    particle_fn = score_fn_from(models[f"particle_{name}"], experiment.sde, prediction=cfg.train_set.prediction,
                                mask=jnp.asarray(mask), cond=jnp.asarray(jet))
    log_p_particles, _ = log_likelihood(particle_fn, experiment.sde, jnp.asarray(particles), mask=jnp.asarray(mask),
                                        **tol)
    np.testing.assert_allclose(arrays["log_p_jet"], np.asarray(log_p_jet), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(arrays["log_p_particles"], np.asarray(log_p_particles), rtol=1e-5, atol=1e-4)


@pytest.mark.e2e
def test_exact_and_hutchinson_particle_likelihoods_agree(anomaly_run):
    workdir, cfg, _, metrics = anomaly_run
    types = list(cfg.data.jet_types)
    n, k = cfg.sampling.num_samples, cfg.sampling.runs.exact.num_jets
    for name, background in cfg.backgrounds.items():
        runs = read_samples(str(workdir / f"scores_{name}.h5"))
        take = np.concatenate([np.arange(i * n, i * n + k) for i in range(len(types))])
        exact, hutch = runs["exact"].arrays, {key: v[take] for key, v in runs["hutchinson"].arrays.items()}
        # The jet stage is exact in both runs; the solver's steps depend on the batch (one adaptive
        # solve per batch): measured 2.2e-3 nats apart at rtol = atol = 1e-3.
        np.testing.assert_allclose(exact["log_p_jet"], hutch["log_p_jet"], rtol=0, atol=1e-2)
        per_particle = [a["log_p_particles"] / a["num_particles"] for a in (exact, hutch)]
        row = metrics["backgrounds"][name]["agreement"]["exact"]
        assert row["particle_term_correlation"] == pytest.approx(np.corrcoef(*per_particle)[0, 1], rel=1e-12)
        # Two Rademacher probes per jet: measured 0.03-0.06 nats per particle on the tiny model.
        assert np.sqrt(np.mean((per_particle[0] - per_particle[1]) ** 2)) < 0.15
        assert row["score_correlation"] > 0.98
        for anomaly in (t for t in types if t not in background):
            keep, labels = _labels(exact, types, background, anomaly)
            assert row["anomalies"][anomaly]["auc_exact"] == pytest.approx(auc(labels, exact["score"][keep]))


@pytest.mark.parametrize("field, value, match", [
    ("backgrounds", {"qcd": ("q", "x")}, "every background type"),
    ("backgrounds", {"all": ("q", "t")}, "no jet type to score"),
    ("backgrounds", {}, "is empty"),
    ("sampling.runs", {"h": {"method": "ode"}}, "must be 'likelihood'"),
    ("sampling.runs", {"h": {"method": "likelihood", "divergence": "hutchinson", "probe": 2}}, "unknown option"),
    ("sampling.runs", {"h": {"method": "likelihood", "divergence": "hutch"}}, "divergence"),
    ("sampling.runs", {"h": {"method": "likelihood", "rtol": 0.0}}, "rtol"),
    ("sampling.runs", {"h": {"method": "likelihood", "divergence": "exact", "num_jets": 4}}, "over every scored jet"),
])
def test_config_errors_name_the_field(field, value, match):
    import ml_collections

    cfg = anomaly_config.get_config("tiny")
    section, _, leaf = field.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = ml_collections.ConfigDict(value)
    with pytest.raises(ConfigError, match=match):
        AnomalyExperiment(cfg, progress=False).validate(1)
