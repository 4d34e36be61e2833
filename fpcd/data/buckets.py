"""Length buckets of padded point clouds: clouds of similar size are batched together, padded to
their bucket's length, so that padding costs little (calorimeter cells, EIC particles).

:func:`bucket_lengths` gives the padded lengths, :func:`training_buckets` assigns each cloud to a
bucket (merging buckets too small for one batch) and :func:`bucketed_batch` draws the training
batch of a step, a function of ``(seed, step)`` only.
"""

from __future__ import annotations

import numpy as np


def bucket_lengths(buckets, max_cells: int) -> tuple[int, ...]:
    """Padded lengths of the N_cells buckets: the ``buckets`` below ``max_cells``, then ``max_cells``."""
    return tuple(sorted({int(b) for b in buckets if b < max_cells})) + (int(max_cells),)


def training_buckets(num_cells, lengths, batch_size):
    """Merge buckets holding fewer than ``batch_size`` showers into the next larger one.

    Returns ``(lengths, bucket index per shower)``."""
    num_cells = np.asarray(num_cells)
    lengths = list(lengths)
    while True:
        index = np.searchsorted(lengths, num_cells)
        counts = np.bincount(index, minlength=len(lengths))
        small = [i for i in range(len(lengths) - 1) if counts[i] < batch_size]
        if not small:
            return tuple(lengths), index
        del lengths[small[0]]


def bucketed_batch(seed: int, step: int, buckets, batch_size: int):
    """``(bucket, indices)`` of the training batch at ``step``: each epoch shuffles every bucket,
    cuts it into full batches and shuffles the batch order, all seeded by ``(seed, epoch)``."""
    members = [np.nonzero(buckets == b)[0] for b in range(int(buckets.max()) + 1)]
    per_epoch = sum(len(m) // batch_size for m in members)
    epoch, position = divmod(int(step), per_epoch)
    rng = np.random.default_rng([int(seed), epoch])
    batches = []
    for b, m in enumerate(members):
        order = rng.permutation(m)
        batches += [(b, order[i * batch_size:(i + 1) * batch_size]) for i in range(len(m) // batch_size)]
    return batches[rng.permutation(len(batches))[position]]
