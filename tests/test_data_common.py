"""What the data modules share (fpcd.data.common): chunked seeds, settings keys, the atomic hdf5
save and the cache of generated files."""

import dataclasses
import os

import h5py
import numpy as np
import pytest

from fpcd.data import common, eic, jetnet
from fpcd.io import DiskFullError


@dataclasses.dataclass(frozen=True)
class ToySettings(common.GeneratorSettingsBase):
    width: float = 1.0
    extra: tuple[str, ...] = ()


def test_chunk_sizes_cover_the_total():
    assert common.chunk_sizes(10, 4) == [4, 4, 2]
    assert common.chunk_sizes(8, 4) == [4, 4]
    assert common.chunk_sizes(3, 250) == [3]


def test_chunk_seeds_differ_per_chunk_and_are_reproducible():
    seeds = [common.chunk_seed(7, 2, chunk) for chunk in range(50)]
    assert len(set(seeds)) == 50 and all(1 <= s <= common.PYTHIA_MAX_SEED for s in seeds)
    assert seeds == [common.chunk_seed(np.int64(7), 2, chunk) for chunk in range(50)]
    assert common.chunk_seed(8, 2, 0) != seeds[0] and common.chunk_seed(7, 3, 0) != seeds[0]
    # The generators' seeds are these: a jet type's stream is its index, EIC's its own stream.
    assert jetnet.chunk_seed(7, "t", 4) == common.chunk_seed(7, jetnet.JET_TYPES.index("t"), 4)
    assert eic.chunk_seed(7, 4) == common.chunk_seed(7, eic.SEED_STREAM, 4)


def test_chunk_rngs_differ_per_chunk_and_are_reproducible():
    draws = [common.chunk_rng(5, chunk).random(4) for chunk in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    np.testing.assert_array_equal(common.chunk_rng(5, 1).random(4), draws[1])
    np.testing.assert_array_equal(common.chunk_rng(5, 1).random(4), np.random.default_rng([5, 1]).random(4))


def test_settings_key_names_every_field():
    key = ToySettings().key()
    assert len(key) == 10 and key == ToySettings().key()
    assert ToySettings(width=2.0).key() != key and ToySettings(extra=("a",)).key() != key
    assert ToySettings().to_json() == '{"width": 1.0, "extra": []}'


def test_check_integer_names_the_argument():
    assert common.check_integer("n", np.int32(3)) == 3 and type(common.check_integer("n", np.int32(3))) is int
    assert common.check_integer("seed", -4, None) == -4
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match="n=.*: expected an integer"):
            common.check_integer("n", bad)
    with pytest.raises(ValueError, match="n=0: must be >= 1"):
        common.check_integer("n", 0)


def test_save_hdf5_writes_datasets_and_attributes(tmp_path):
    path = common.save_hdf5(str(tmp_path / "sub" / "a.h5"), {"x": np.arange(6.0).reshape(2, 3), "y": np.ones(2)},
                            {"seed": 3, "settings": None, "name": "toy"}, compressed=("x",))
    assert os.path.isabs(path)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(6.0).reshape(2, 3))
        assert f["x"].compression == "gzip" and f["y"].compression is None
        assert dict(f.attrs) == {"seed": 3, "name": "toy"}  # None attributes are left out


def test_save_hdf5_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = common.save_hdf5(str(tmp_path / "a.h5"), {"x": np.zeros(3)})
    before = open(path, "rb").read()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.File, "create_dataset", full)
    with pytest.raises(DiskFullError, match="a.h5"):
        common.save_hdf5(path, {"x": np.ones(3)})
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    with pytest.raises(TypeError):  # any failure, not only a full disk
        common.save_hdf5(path, {"x": object()})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["a.h5"]  # no temporary file left behind


def test_cached_generate_hits_the_cache_then_regenerates_when_a_setting_changes(tmp_path):
    calls = []

    def cached(settings):
        def generate():
            calls.append(settings)
            return np.full(3, settings.width)

        path = common.cache_path("toy", "n3_seed0", settings, str(tmp_path))
        return common.cached_generate(path, generate, lambda data, p: common.save_hdf5(p, {"x": data}),
                                      lambda p: h5py.File(p)["x"][()])

    first = cached(ToySettings())
    second = cached(ToySettings())
    assert calls == [ToySettings()]
    np.testing.assert_array_equal(second, first)
    changed = cached(ToySettings(width=2.0))
    assert calls == [ToySettings(), ToySettings(width=2.0)]
    np.testing.assert_array_equal(changed, np.full(3, 2.0))
    assert sorted(os.listdir(tmp_path / "toy")) == sorted(f"n3_seed0_{s.key()}.h5" for s in calls)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FPCD_CACHE", str(tmp_path / "c"))
    assert common.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("FPCD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert common.default_cache_dir() == str(tmp_path / "x" / "fpcd")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert common.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "fpcd")
    assert common.cache_path("eic", "dis", ToySettings()) == os.path.join(
        os.path.expanduser("~"), ".cache", "fpcd", "eic", f"dis_{ToySettings().key()}.h5")


def test_generate_in_chunks_returns_results_in_task_order():
    results = common.generate_in_chunks("math:factorial", [3, 4, 5], [1, 1, 1], workers=1, description="toy",
                                        unit="item", progress=False)
    assert results == [6, 24, 120]
