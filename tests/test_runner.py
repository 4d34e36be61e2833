"""Unit tests of the runner's own logic (:mod:`fpcd.runner`), without training: the run's identity,
run keys, the samples files, the messages of failures, the rows of each process and the batched
evaluation loop."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, _environment
from fpcd.checkpoint import UnreadableCheckpointError
from fpcd.data.calo import CaloDataError
from fpcd.data.eic import EicDataError
from fpcd.data.jetnet import JetDataError
from fpcd.errors import ConfigError, ExpectedError
from fpcd.experiments.calo import CaloExperiment
from fpcd.io import DiskFullError, WorkdirLockedError
from fpcd.parallel import data_mesh
from fpcd.runner import (NONFINITE_REASON, BatchSampler, Experiment, RunSamples, batch_rows, check_workdir,
                         expected_error_message, explain_nonfinite, prepare_workdir, process_rows, read_samples,
                         run_batched, run_key, student_runs, write_samples)
from fpcd.train import NonFiniteLossError


def _key_data(key):
    return np.asarray(jax.random.key_data(key))


# --- the workdir and the run's identity ------------------------------------------------------------

IDENTITY = ("experiment", "seed", "model")


def _config(width=8, num_steps=100):
    return {"experiment": "toy", "seed": 0, "model": {"width": width}, "train": {"num_steps": num_steps}}


def test_a_workdir_without_config_holds_no_run_and_one_of_the_same_config_is_accepted(tmp_path):
    workdir = str(tmp_path / "w")
    assert not check_workdir(workdir, _config(), IDENTITY)
    prepare_workdir(workdir, _config(), IDENTITY)
    assert json.loads((tmp_path / "w" / "config.json").read_text()) == _config()
    assert check_workdir(workdir, _config(), IDENTITY)
    assert check_workdir(workdir, _config(num_steps=500), IDENTITY)  # longer training: the same run


def test_a_workdir_of_another_run_is_refused_naming_the_difference(tmp_path):
    workdir = str(tmp_path)
    prepare_workdir(workdir, _config(), IDENTITY)
    with pytest.raises(ConfigError, match=r"different config \(model.width: 8 -> 16\)"):
        check_workdir(workdir, _config(width=16), IDENTITY)
    with pytest.raises(ConfigError, match="holds a run of experiment 'toy', not 'other'"):
        check_workdir(workdir, {**_config(), "experiment": "other"}, IDENTITY)
    with pytest.raises(ConfigError, match="different config"):  # prepare_workdir refuses it too, writing nothing
        prepare_workdir(workdir, _config(width=16), IDENTITY)
    assert json.loads((tmp_path / "config.json").read_text()) == _config()


def test_a_workdir_recorded_before_a_field_was_added_is_still_the_same_run(tmp_path):
    """``CaloExperiment.FIELDS_ADDED_LATER``: a calo run recorded without ``cell_model.layer_embedding``
    holds the model without it (False); True is another model and is refused."""
    config = {"experiment": "calo", "cell_model": {"width": 64, "layer_embedding": False}}
    old = {"experiment": "calo", "cell_model": {"width": 64}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    added_later = CaloExperiment.FIELDS_ADDED_LATER
    assert check_workdir(str(tmp_path), config, ("experiment", "cell_model"), added_later)
    config["cell_model"]["layer_embedding"] = True
    with pytest.raises(ConfigError, match="cell_model.layer_embedding: False -> True"):
        check_workdir(str(tmp_path), config, ("experiment", "cell_model"), added_later)


def test_a_workdir_recorded_before_its_sections_were_renamed_is_still_the_same_run(tmp_path):
    """``FIELDS_RENAMED``: an EIC run recorded with the old stage sections (``train_event``,
    ``train``) is the run of the same config under ``train_global``/``train_set``; a different value
    is named under the new name, and ``train`` does not capture ``train_event``."""
    from fpcd.experiments.eic import EicExperiment
    from fpcd.runner.workdir import renamed_fields

    identity = ("experiment", "train_set.prediction", "train_global.prediction")
    config = {"experiment": "eic", "train_global": {"prediction": "v", "num_steps": 60},
              "train_set": {"prediction": "v", "num_steps": 60}}
    old = {"experiment": "eic", "train_event": {"prediction": "v", "num_steps": 30},
           "train": {"prediction": "v", "num_steps": 30}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    renamed = EicExperiment.FIELDS_RENAMED
    assert check_workdir(str(tmp_path), config, identity, None, renamed)
    with pytest.raises(ConfigError, match="different config"):  # without the declaration: another run
        check_workdir(str(tmp_path), config, identity)
    config["train_global"]["prediction"] = "eps"
    with pytest.raises(ConfigError, match="train_global.prediction: 'v' -> 'eps'"):
        check_workdir(str(tmp_path), config, identity, None, renamed)
    assert renamed_fields({"train_event.t_min": 1, "train.t_min": 2, "train_events": 3}, renamed) == {
        "train_global.t_min": 1, "train_set.t_min": 2, "train_events": 3}
    prepare_workdir(str(tmp_path), {**config, "train_global": {"prediction": "v", "num_steps": 60}}, identity, None,
                    renamed)
    assert "train_global" in json.loads((tmp_path / "config.json").read_text())  # rewritten under the new names


def test_without_a_declaration_a_field_missing_from_the_saved_config_is_a_difference(tmp_path):
    assert Experiment.FIELDS_ADDED_LATER == {}
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "calo", "cell_model": {"width": 64}}))
    config = {"experiment": "calo", "cell_model": {"width": 64, "layer_embedding": False}}
    with pytest.raises(ConfigError, match="cell_model.layer_embedding: None -> False"):
        check_workdir(str(tmp_path), config, ("experiment", "cell_model"), Experiment.FIELDS_ADDED_LATER)


def test_an_unreadable_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json cannot be read"):
        check_workdir(str(tmp_path), _config(), IDENTITY)


# --- runs and their keys ---------------------------------------------------------------------------


def _distill_config():
    return ml_collections.ConfigDict({"distill": {"t_min": 1e-3, "teacher_steps": 8}})


def test_students_draw_with_the_key_of_the_teachers_ddim_at_the_same_steps():
    runs = {"em_20": {"method": "em", "steps": 20}, "ddim_2": {"method": "ddim", "steps": 2, "t_min": 1e-3}}
    entries = student_runs(_distill_config(), runs, (4, 2))
    names = [e[0] for e in entries]
    assert names == ["em_20", "ddim_2", "ddim_4", "student_4", "student_2"]
    by_name = {e[0]: e for e in entries}
    assert [by_name[n][3] for n in names] == [0, 1, 2, 2, 1]  # key indices
    assert [by_name[n][2] for n in names] == ["teacher", "teacher", "teacher", 4, 2]  # whose models
    assert by_name["student_4"][1] == {"method": "ddim", "steps": 4, "t_min": 1e-3}
    assert by_name["student_4"][4] == {"student": True, "teacher_steps": 8, "distilled_from_steps": 8}
    assert student_runs(_distill_config(), runs, ()) == [(n, r, "teacher", i, {}) for i, (n, r) in
                                                         enumerate(runs.items())]


def test_run_keys_fold_in_the_group_then_the_run():
    key = jax.random.key(3)
    np.testing.assert_array_equal(_key_data(run_key(key, ("",), 0, 2)), _key_data(jax.random.fold_in(key, 2)))
    expected = jax.random.fold_in(jax.random.fold_in(key, 1), 2)
    np.testing.assert_array_equal(_key_data(run_key(key, ("g", "q"), 1, 2)), _key_data(expected))


# --- samples files ---------------------------------------------------------------------------------


def test_samples_files_round_trip_every_run_and_hold_the_first_at_the_top(tmp_path):
    path = str(tmp_path / "samples.h5")
    runs = {"em_20": RunSamples({"samples": np.arange(6, dtype=np.float32).reshape(3, 2), "n": np.arange(3)},
                                {"nfe": 20, "seconds": 0.5}, {"method": "em", "steps": 20}),
            "ode": RunSamples({"samples": np.ones((3, 2), np.float32), "n": np.zeros(3, np.int64)},
                              {"nfe": 44, "seconds": 1.5}, {"method": "ode", "rtol": 1e-3})}
    write_samples(path, runs, {"group": "g"})
    back = read_samples(path)
    assert set(back) == set(runs)
    for name, r in runs.items():
        assert back[name].info == r.info and back[name].run == r.run
        for k, array in r.arrays.items():
            np.testing.assert_array_equal(back[name].arrays[k], array)
            assert back[name].arrays[k].dtype == array.dtype
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["samples"][()], runs["em_20"].arrays["samples"])
        assert f.attrs["run"] == "em_20" and f.attrs["group"] == "g"
    with pytest.raises(ConfigError, match="does not exist; run with --mode=sample first"):
        read_samples(str(tmp_path / "none.h5"))


def test_a_full_disk_writing_samples_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "samples.h5"
    runs = {"em_20": RunSamples({"samples": np.zeros((3, 2), np.float32)}, {"nfe": 20}, {"method": "em"})}
    write_samples(str(path), runs)
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Unable to synchronously create dataset (file write failed: errno = 28, error "
                                    "message = 'No space left on device')")

    monkeypatch.setattr(h5py, "File", full)
    with pytest.raises(DiskFullError) as info:
        write_samples(str(path), runs)
    assert expected_error_message(info.value).startswith(f"no space left on device writing {path}")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["samples.h5"]


# --- messages of failures --------------------------------------------------------------------------


def test_nonfinite_metrics_get_the_reason_of_their_longest_prefix():
    metrics = {"w1": {"em": float("nan"), "ode": 0.1}, "ll": {"a": {"b": float("inf")}, "c": float("-inf")},
               "nonfinite": {"ll": "too few finite samples", "ll.a.b": "the solve diverged"}}
    explain_nonfinite(metrics)
    assert metrics["nonfinite"] == {"w1.em": f"nan, written as null: {NONFINITE_REASON}",
                                    "ll.a.b": "inf, written as null: the solve diverged",
                                    "ll.c": "-inf, written as null: too few finite samples"}
    finite = explain_nonfinite({"w1": 0.1, "nonfinite": {"w1": "unused"}})
    assert finite == {"w1": 0.1}


class _MultiLineError(ExpectedError, ValueError):
    pass


@pytest.mark.parametrize("error", [
    ConfigError("config.train.batch_size must be an integer >= 1, got 0"),
    CaloDataError("x.h5: not a readable hdf5 file"),
    EicDataError("x.h5: no such file"),
    JetDataError("q.hdf5: no such file"),
    NonFiniteLossError("train score: non-finite loss nan at step 3; training stopped."),
    WorkdirLockedError("workdir runs/x is in use by another run (pid 1 on host h)"),
    UnreadableCheckpointError("no step of runs/x/checkpoints/score can be read"),
    OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.json"),
], ids=lambda e: type(e).__name__)
def test_expected_errors_have_a_one_line_message(error):
    """What ``experiments/main.py`` prints for each expected error (an unexpected one keeps its traceback)."""
    message = expected_error_message(error, "runs/x")
    assert message and "\n" not in message
    if isinstance(error, OSError):
        assert message.startswith("no space left on device") and "/data/run/metrics.json" in message
    assert expected_error_message(RuntimeError("a bug")) is None


def test_any_expected_error_is_one_line_and_a_plain_value_error_is_a_bug():
    assert expected_error_message(_MultiLineError("first line\n   second line\n")) == "first line second line"
    assert expected_error_message(ValueError("a bug")) is None


def test_a_full_disk_is_named_with_its_path_or_the_workdir():
    assert expected_error_message(OSError(errno.ENOSPC, "No space left on device"), "runs/x") == (
        "no space left on device writing runs/x: free some space and run again (files written before are intact)")
    try:
        try:
            raise DiskFullError("/data/run/train_log.jsonl")
        except DiskFullError as err:
            raise RuntimeError("writing the log failed") from err
    except RuntimeError as wrapped:
        message = expected_error_message(wrapped, "runs/x")
    assert message == str(DiskFullError("/data/run/train_log.jsonl"))


# --- processes and the batched loop ----------------------------------------------------------------


def test_one_process_feeds_every_row():
    assert process_rows(data_mesh(jax.devices()[:1]), 8) == slice(0, 8)


def test_batch_rows_wrap_around():
    np.testing.assert_array_equal(batch_rows(2, 4, 10), [8, 9, 0, 1])


def test_run_batched_gives_batch_i_the_key_fold_in_i_and_trims_the_last_batch():
    key = jax.random.key(7)
    calls = []

    def fn(rows, k):
        calls.append((np.asarray(rows["x"]), _key_data(k)))
        noise = jax.random.uniform(k, (4,))
        return {"y": rows["x"] * 10.0 + noise, "x": rows["x"]}, len(calls)

    x = np.arange(10, dtype=np.float32)
    result = run_batched(fn, key, num_items=10, batch_size=4, inputs={"x": x}, progress=False)
    assert len(calls) == 4  # the warm-up, then three batches
    np.testing.assert_array_equal(calls[0][0], x[:4])  # the warm-up compiles on batch 0's rows ...
    np.testing.assert_array_equal(calls[0][1], _key_data(jax.random.fold_in(key, 10**6)))  # ... with its own key
    for i, (rows, k) in enumerate(calls[1:]):
        np.testing.assert_array_equal(rows, x[batch_rows(i, 4, 10)])
        np.testing.assert_array_equal(k, _key_data(jax.random.fold_in(key, i)))
    np.testing.assert_array_equal(result.outputs["x"], x)  # in order, the wrapped rows dropped
    expected = np.concatenate([x[batch_rows(i, 4, 10)] * 10.0 + np.asarray(jax.random.uniform(
        jax.random.fold_in(key, i), (4,))) for i in range(3)])[:10]
    np.testing.assert_array_equal(result.outputs["y"], expected)
    assert [int(e) for e in result.extras] == [2, 3, 4] and result.seconds >= 0.0


def test_run_batched_warms_up_with_the_given_function():
    seen = []

    def fn(rows, k):
        seen.append("fn")
        return jnp.zeros(2), 1

    def warmup(rows, k):
        seen.append("warmup")
        return jnp.zeros(2), 0

    result = run_batched(fn, jax.random.key(0), num_items=3, batch_size=2, warmup=warmup, progress=False)
    assert seen == ["warmup", "fn", "fn"] and result.outputs.shape == (3,)


def test_batch_sampler_draws_batch_i_with_fold_in_i_through_its_sample_function():
    """A sample function other than :func:`fpcd.sampling.sample` (a baseline) gets the batch's
    condition and mask rows, the run's options (warm-up options first) and ``fold_in(key, i)``."""
    calls = []

    def fake_sample(score_fn, sde, key, shape, *, method, mask=None, **options):
        calls.append((score_fn, _key_data(key), options))
        return jax.random.normal(key, shape), 10 + len(calls)

    conditions, mask = np.arange(5, dtype=np.float32)[:, None], np.ones((5, 3), np.float32)
    sampler = BatchSampler(sde=None, mesh=None, progress=False, sample_fn=fake_sample)
    key = jax.random.key(1)
    samples, nfe, seconds = sampler(lambda c, m: (np.asarray(c), np.asarray(m)), key, num_samples=5, batch_size=2,
                                    sample_shape=(3,), run={"method": "em", "steps": 20}, description="",
                                    conditions=conditions, mask=mask)
    assert samples.shape == (5, 3) and nfe == 14 and seconds >= 0.0
    assert calls[0][2] == {"steps": 1} and all(c[2] == {"steps": 20} for c in calls[1:])
    np.testing.assert_array_equal(calls[0][1], _key_data(jax.random.fold_in(key, 10**6)))
    for i, (score, k, _) in enumerate(calls[1:]):
        np.testing.assert_array_equal(k, _key_data(jax.random.fold_in(key, i)))
        np.testing.assert_array_equal(score[0], conditions[batch_rows(i, 2, 5)])
    expected = np.concatenate([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (2, 3)))
                               for i in range(3)])[:5]
    np.testing.assert_array_equal(samples, expected)


FOUR_DEVICES = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from fpcd.parallel import data_mesh
    from fpcd.runner import batch_placement, process_rows, run_batched

    mesh = data_mesh()
    key = jax.random.key(5)
    x = np.arange(10, dtype=np.float32)

    def fn(rows, k):
        return rows["x"] * 2.0 + jax.random.uniform(k, rows["x"].shape), 1

    sharding = batch_placement(mesh, 8)
    shards = []
    sharded = run_batched(lambda rows, k: (shards.append(len(rows["x"].sharding.device_set)) or fn(rows, k)), key,
                          num_items=10, batch_size=8, inputs={"x": x}, sharding=sharding, progress=False)
    single = run_batched(fn, key, num_items=10, batch_size=8, inputs={"x": x}, progress=False)
    rows = process_rows(mesh, 8)
    print(json.dumps({"devices": jax.device_count(), "rows": [rows.start, rows.stop], "shards": shards,
                      "odd_batch_unsharded": batch_placement(mesh, 6) is None,
                      "equal": bool(np.array_equal(sharded.outputs, single.outputs))}))
""")


@pytest.mark.e2e
def test_on_four_devices_one_process_feeds_every_row_and_sharded_batches_match_unsharded():
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, cwd=REPO,
                          env=_environment(4), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["rows"] == [0, 8]
    assert out["shards"] == [4, 4, 4] and out["odd_batch_unsharded"] and out["equal"]
