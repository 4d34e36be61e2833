"""Length buckets of padded point clouds (fpcd.data.buckets)."""

import numpy as np

from fpcd.data import buckets


def test_buckets():
    counts = np.array([5, 10, 40, 41, 70, 120, 130, 10, 12, 33])
    lengths, index = buckets.training_buckets(counts, (32, 64, 136), batch_size=3)
    assert lengths == (32, 64, 136)
    assert np.all(counts <= np.asarray(lengths)[index])
    lengths, index = buckets.training_buckets(counts, (32, 64, 136), batch_size=4)
    assert lengths == (32, 136)  # the 64-bucket held 3 < 4 showers and merges upwards
    bucket, idx = buckets.bucketed_batch(0, 5, index, 4)
    assert len(idx) == 4 and np.all(index[idx] == bucket)
    np.testing.assert_array_equal(buckets.bucketed_batch(0, 5, index, 4)[1], idx)


def test_bucket_lengths_end_at_the_largest_cloud():
    assert buckets.bucket_lengths([64, 32, 32, 200], 136) == (32, 64, 136)
    assert buckets.bucket_lengths([], 49) == (49,)


def test_every_training_cloud_appears_once_per_epoch():
    counts = np.array([5, 10, 40, 41, 70, 120, 130, 10, 12, 33, 3, 50])
    lengths, index = buckets.training_buckets(counts, (32, 64, 136), batch_size=2)
    per_epoch = sum(int(np.sum(index == b)) // 2 for b in range(len(lengths)))
    seen = np.concatenate([buckets.bucketed_batch(3, step, index, 2)[1] for step in range(per_epoch)])
    assert len(np.unique(seen)) == len(seen) == 2 * per_epoch
