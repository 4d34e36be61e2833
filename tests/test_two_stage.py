"""The shared two-stage layer (fpcd.experiments.two_stage): its small pieces, its training stages,
its sampling (against a fake sampler that records what it is asked), and the toy experiment of
tests/toy_experiment.py trained, sampled and evaluated end to end through the runner."""

import json

import jax
import numpy as np
import pytest

from fpcd.experiments.two_stage import (array_stage, bucketed_stage, lengths_mask, run_row, sample_global, sample_set,
                                        split, table_cell)
from fpcd.data import buckets
from fpcd.nets import NetworkScore
from fpcd.runner import BatchSampler, RunSamples, run_key, train_and_evaluate
from fpcd.sde import VPSDE
from fpcd.config import train_section
from fpcd.train import batch_indices
from fpcd.parallel import data_mesh


class Items:
    """Anything with ``len`` and ``take(slice)``, as :func:`split` asks."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def __len__(self):
        return len(self.values)

    def take(self, rows):
        return Items(self.values[rows])


def key_data(key):
    return np.asarray(jax.random.key_data(key))


# --- small pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, cut", [(10, 0.3, 7), (10, 0.25, 8), (7, 0.5, 4), (5, 0.0, 5)])
def test_split_keeps_the_order_and_makes_the_rounded_last_fraction_the_test_split(n, fraction, cut):
    train, test = split(Items(np.arange(n) * 10), fraction)
    np.testing.assert_array_equal(train.values, np.arange(cut) * 10)
    np.testing.assert_array_equal(test.values, np.arange(cut, n) * 10)


def test_run_row_puts_method_options_and_info_in_that_order_without_changing_the_run():
    run = {"method": "pc", "steps": 20, "snr": 0.16}
    row = run_row(RunSamples(arrays={"x": np.zeros(3)}, info={"nfe": 40, "seconds": 1.5}, run=run))
    assert row == {"method": "pc", "options": {"steps": 20, "snr": 0.16}, "nfe": 40, "seconds": 1.5}
    assert list(row) == ["method", "options", "nfe", "seconds"]
    assert run == {"method": "pc", "steps": 20, "snr": 0.16}


def test_lengths_mask_sets_the_first_count_entries_of_each_row():
    mask = lengths_mask([0, 2, 3, 1], 3)
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, [[0, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])


def test_table_cell_is_right_aligned_with_the_given_decimals_and_a_dash_for_none():
    assert table_cell(0.12345, 8, 3) == "   0.123"
    assert table_cell(12.5, 6, 1) == "  12.5"
    assert table_cell(None, 5, 3) == "    -"


# --- training stages ------------------------------------------------------------------------------


def section(batch_size):
    return train_section(num_steps=10, batch_size=batch_size, learning_rate=1e-3, warmup_steps=1, checkpoint_every=5)


def test_array_stage_batches_are_the_seeded_rows_of_every_array():
    arrays = {"x": np.arange(20.0).reshape(10, 2), "cond": np.arange(10.0)[:, None] * -1}
    key = jax.random.key(4)
    stage = array_stage("global", "model", section(4), key, seed=3, arrays=arrays)
    assert (stage.name, stage.model, stage.train.batch_size) == ("global", "model", 4)
    np.testing.assert_array_equal(key_data(stage.key), key_data(key))
    for step in (0, 1, 2, 5):
        idx = batch_indices(3, step, 10, 4)
        for rows in (slice(0, 4), slice(1, 3)):
            batch = stage.batch(step, rows)
            assert set(batch) == {"x", "cond"}
            np.testing.assert_array_equal(batch["x"], arrays["x"][idx[rows]])
            np.testing.assert_array_equal(batch["cond"], arrays["cond"][idx[rows]])
    assert not np.array_equal(stage.batch(0, slice(0, 4))["x"], stage.batch(1, slice(0, 4))["x"])
    np.testing.assert_array_equal(stage.probe_batch(slice(0, 4))["x"], stage.batch(0, slice(0, 4))["x"])
    assert array_stage("global", "model", section(4), key, seed=3, arrays=arrays, probe=False).probe_batch is None


def test_array_stage_applies_the_transform_to_this_steps_rows():
    arrays = {"x": np.arange(8.0)[:, None]}
    seen = []

    def transform(batch, step, rows):
        seen.append((step, rows))
        return {"x": batch["x"] + 1000 * step}

    stage = array_stage("global", None, section(4), jax.random.key(0), seed=1, arrays=arrays, transform=transform)
    out = stage.batch(3, slice(2, 4))
    np.testing.assert_array_equal(out["x"], arrays["x"][batch_indices(1, 3, 8, 4)[2:4]] + 3000)
    assert seen == [(3, slice(2, 4))]


def test_bucketed_stage_pads_each_batch_to_its_bucket_and_the_probe_to_the_longest():
    bucket_of = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    lengths = (3, 7)
    calls = []

    def rows_batch(indices, rows, length, step):
        calls.append((np.asarray(indices), rows, length, step))
        return {"length": length}

    stage = bucketed_stage("set", "model", section(2), jax.random.key(0), seed=5, bucket_of=bucket_of,
                           lengths=lengths, rows_batch=rows_batch)
    seen_buckets = set()
    for step in range(6):
        bucket, indices = buckets.bucketed_batch(5, step, bucket_of, 2)
        assert stage.batch(step, slice(1, 2)) == {"length": lengths[bucket]}
        got_indices, rows, length, got_step = calls[-1]
        np.testing.assert_array_equal(got_indices, indices)  # the whole global batch, every process alike
        assert (rows, length, got_step) == (slice(1, 2), lengths[bucket], step)
        assert np.all(bucket_of[indices] == bucket)
        seen_buckets.add(bucket)
    assert seen_buckets == {0, 1}
    assert stage.probe_batch(slice(0, 2)) == {"length": 7}
    got_indices, rows, length, got_step = calls[-1]
    np.testing.assert_array_equal(got_indices, buckets.bucketed_batch(5, 0, bucket_of, 2)[1])
    assert (rows, length, got_step) == (slice(0, 2), 7, 0)


# --- sampling -------------------------------------------------------------------------------------


class FakeSampler:
    """Stands in for :class:`~fpcd.runner.BatchSampler`: records each call; draws each row as its
    condition's first entry at every real point (zero at padded points, as the samplers keep
    padding), NFE ``10 * (call number + 1)`` and ``call number + 0.5`` seconds."""

    def __init__(self):
        self.calls = []

    def __call__(self, make_score, key, *, num_samples, batch_size, sample_shape, run, description, conditions,
                 mask=None):
        score = make_score(None if conditions is None else np.asarray(conditions), mask)
        self.calls.append(dict(score=score, key=key_data(key), num_samples=num_samples, batch_size=batch_size,
                               sample_shape=sample_shape, run=run, description=description, conditions=conditions,
                               mask=mask))
        x = np.full((num_samples, *sample_shape), -7.0, np.float32)
        if conditions is not None:
            x = np.broadcast_to(np.asarray(conditions)[:, :1].reshape((-1,) + (1,) * len(sample_shape)),
                                x.shape).copy()
        if mask is not None:
            x = x * mask[..., None]
        n = len(self.calls) - 1
        return x, 10 * (n + 1), n + 0.5


SDE = VPSDE()


def test_sample_global_draws_every_event_once_with_the_global_score():
    sampler = FakeSampler()
    key = jax.random.key(9)
    conditions = np.arange(6.0)[:, None]
    run = {"method": "ddim", "steps": 5}
    x, nfe, seconds = sample_global(sampler, "global model", SDE, run, key, prediction="v", num_samples=6,
                                    batch_size=3, num_features=4, description="globals", conditions=conditions,
                                    x0_bounds=(-1.0, 1.0))
    assert x.shape == (6, 4) and (nfe, seconds) == (10, 0.5)
    [call] = sampler.calls
    np.testing.assert_array_equal(call["key"], key_data(key))
    assert (call["num_samples"], call["batch_size"], call["sample_shape"], call["run"], call["description"]) == \
        (6, 3, (4,), run, "globals")
    assert call["conditions"] is conditions and call["mask"] is None
    score = call["score"]
    assert isinstance(score, NetworkScore)
    assert (score.model, score.prediction, score.x0_bounds, score.mask) == ("global model", "v", (-1.0, 1.0), None)
    np.testing.assert_array_equal(score.cond, conditions)


def test_sample_set_without_buckets_pads_every_event_to_the_longest():
    sampler = FakeSampler()
    key = jax.random.key(2)
    counts = np.array([3, 1, 4])
    conditions = np.array([[10.0], [11.0], [12.0]])
    x, nfe, seconds = sample_set(sampler, "set model", SDE, {"method": "ddim"}, key, prediction="eps", counts=counts,
                                 max_length=5, num_features=2, conditions=conditions, batch_size=lambda n: 2 * n,
                                 description="points")
    [call] = sampler.calls
    np.testing.assert_array_equal(call["key"], key_data(key))
    assert (call["num_samples"], call["batch_size"], call["sample_shape"], call["description"]) == \
        (3, 6, (5, 2), "points")
    np.testing.assert_array_equal(call["mask"], lengths_mask(counts, 5))
    np.testing.assert_array_equal(call["score"].mask, lengths_mask(counts, 5))
    np.testing.assert_array_equal(call["score"].cond, conditions)
    assert call["score"].prediction == "eps"
    assert x.shape == (3, 5, 2) and (nfe, seconds) == (10, 0.5)
    for i, c in enumerate(counts):
        assert np.all(x[i, :c] == conditions[i, 0]) and np.all(x[i, c:] == 0)


def test_sample_set_draws_each_bucket_with_its_own_key_and_length_and_restores_the_order():
    sampler = FakeSampler()
    key = jax.random.key(3)
    lengths = (2, 3, 4, 6)
    counts = np.array([1, 5, 2, 4, 4, 6])  # buckets 0, 3, 0, 2, 2, 3; bucket 1 is empty
    conditions = np.arange(6.0)[:, None] + 100  # row i draws 100 + i
    x, nfe, seconds = sample_set(sampler, "set model", SDE, {"method": "ddim"}, key, prediction="eps", counts=counts,
                                 max_length=7, num_features=2, conditions=conditions, batch_size=lambda n: n + 1,
                                 description="points", lengths=lengths)
    assert [c["description"] for c in sampler.calls] == ["points (<= 2)", "points (<= 4)", "points (<= 6)"]
    for call, bucket, rows in zip(sampler.calls, (0, 2, 3), ([0, 2], [3, 4], [1, 5])):
        np.testing.assert_array_equal(call["key"], key_data(jax.random.fold_in(key, bucket)))  # by bucket, not call
        length = lengths[bucket]
        assert (call["num_samples"], call["batch_size"], call["sample_shape"]) == (len(rows), len(rows) + 1,
                                                                                   (length, 2))
        np.testing.assert_array_equal(call["conditions"], conditions[rows])
        np.testing.assert_array_equal(call["mask"], lengths_mask(counts[rows], length))
        np.testing.assert_array_equal(call["score"].mask, lengths_mask(counts[rows], length))
    assert x.shape == (6, 7, 2)
    for i, c in enumerate(counts):  # each event back in its row, its padding zero up to max_length
        assert np.all(x[i, :c] == 100 + i) and np.all(x[i, c:] == 0), i
    assert nfe == 30 and seconds == pytest.approx(0.5 + 1.5 + 2.5)  # the largest NFE, the summed seconds


GLOBAL_STEPS, SET_STEPS = 1500, 1500
COUNTS_AND_CENTROID_FACTORS = {"counts": 4.0, "centroid_x": 4.0}


# --- the toy experiment end to end ----------------------------------------------------------------


@pytest.mark.e2e
def test_toy_experiment_trains_samples_and_evaluates_through_the_runner(tmp_path):
    """The toy of tests/toy_experiment.py, trained, sampled and evaluated through the runner, beats its
    untrained networks (same keys) and comes within a factor of the truth-vs-truth floor.

    Measured with DDIM 20 on 400 events (W1 counts, W1 centroid, centre-centroid correlation; floor
    counts 0.14, centroid 0.078), on a contended 2-core machine: 20/20 steps 1.70, 0.617, -0.20;
    600/300 steps 0.86, 0.573, 0.68 (30 s); 1500/1500 steps 0.395, 0.221, 0.976 (48 s, chosen);
    2000/800 steps 0.35, 0.395, 0.92 (50 s); 3000/3000 steps 0.315, 0.130, 0.990 (73 s). At
    1500/1500 both W1s are 2.8x their floors, hence the factor 4."""
    from toy_experiment import ToyExperiment, toy_config

    cfg = toy_config(global_steps=GLOBAL_STEPS, set_steps=SET_STEPS)
    mesh = data_mesh(jax.devices()[:1])
    metrics = train_and_evaluate(ToyExperiment(cfg, progress=False), str(tmp_path), "all", mesh)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    floor, trained = saved["floor"], saved["runs"]["ddim_20"]
    assert trained["method"] == "ddim" and trained["options"] == {"steps": 20} and trained["nfe"] == 40
    assert metrics["runs"]["ddim_20"]["counts"] == trained["counts"]

    # The untrained networks sample from the same keys: what a model that learnt nothing gives.
    experiment = ToyExperiment(cfg, progress=False)
    data = experiment.load_data()
    untrained = {stage.name: stage.model for stage in experiment.stages(data)}
    run = dict(cfg.sampling.runs["ddim_20"])
    key = run_key(experiment.key("sampling"), ("",), 0, 0)
    arrays, info = experiment.generate(data, untrained, "", run, key, BatchSampler(experiment.sde, mesh,
                                                                                  progress=False))
    baseline = experiment.evaluate_w1(data, {"": {"ddim_20": RunSamples(arrays, info, run)}}, untrained,
                                      figures_dir=None)["runs"]["ddim_20"]
    for feature, factor in COUNTS_AND_CENTROID_FACTORS.items():
        assert trained[feature] < 0.6 * baseline[feature], (feature, trained[feature], baseline[feature])
        assert trained[feature] < factor * floor[feature], (feature, trained[feature], floor[feature])
    assert trained["centre_centroid_correlation"] > 0.5 > baseline["centre_centroid_correlation"]
