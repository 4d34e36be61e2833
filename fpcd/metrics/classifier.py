"""A generated-vs-truth classifier: the AUC of an MLP separating two samples of feature rows
(0.5: indistinguishable), used by the calo and EIC evaluations."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(np.asarray(scores, np.float64))
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("roc_auc needs both classes")
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def separating_features(truth, generated, names, *, top: int = 5) -> list[dict]:
    """The ``top`` feature columns that separate two samples best on their own: per column the AUC
    of the column itself as a score (generated = positive), ranked by ``|AUC - 0.5|``.

    A diagnostic beside :func:`classifier_auc`: it names the observables the classifier can use,
    e.g. ``[{"feature": "log10 E layer 0", "auc": 0.31}, ...]`` (AUC < 0.5: lower in generated).
    """
    truth, generated = np.asarray(truth, np.float64), np.asarray(generated, np.float64)
    if truth.ndim != 2 or generated.ndim != 2 or truth.shape[1] != generated.shape[1]:
        raise ValueError(f"separating_features: truth {truth.shape} and generated {generated.shape} must be "
                         "(N, F) arrays with the same F")
    if len(names) != truth.shape[1]:
        raise ValueError(f"separating_features: {len(names)} names for {truth.shape[1]} feature columns")
    labels = np.r_[np.zeros(len(truth)), np.ones(len(generated))]
    aucs = [roc_auc(labels, np.r_[truth[:, j], generated[:, j]]) for j in range(truth.shape[1])]
    order = np.argsort([-abs(a - 0.5) for a in aucs], kind="stable")[:top]
    return [{"feature": str(names[j]), "auc": float(aucs[j])} for j in order]


def _bce(model, x, y):
    logits = jax.vmap(model)(x)[:, 0]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


def classifier_auc(truth, generated, *, seed: int = 0, hidden: tuple = (256, 256), epochs: int = 60,
                   batch_size: int = 256, learning_rate: float = 5e-4) -> dict:
    """Train an MLP to separate ``generated`` (label 1) from ``truth`` (label 0) feature rows.

    Splits each class 60/20/20 into train/test/validation (as the CaloChallenge), standardises
    with the training statistics, trains with Adam on binary cross-entropy, keeps the epoch with
    the lowest test loss and reports on the validation split: ``auc`` (0.5 = indistinguishable),
    ``jsd = (ln 2 - BCE) / ln 2`` (uncalibrated, so a lower bound) and the ``best_epoch``.
    """
    truth, generated = np.asarray(truth, np.float32), np.asarray(generated, np.float32)
    if truth.ndim != 2 or generated.ndim != 2 or truth.shape[1] != generated.shape[1]:
        raise ValueError(f"feature arrays must be (N, F) with equal F, got {truth.shape} and {generated.shape}")
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": [], "val": []}
    for label, rows in ((0.0, truth), (1.0, generated)):
        order = rng.permutation(len(rows))
        a, b = int(0.6 * len(rows)), int(0.8 * len(rows))
        for name, index in (("train", order[:a]), ("test", order[a:b]), ("val", order[b:])):
            splits[name].append((rows[index], np.full(len(index), label, np.float32)))
    data = {k: (np.concatenate([v[0] for v in parts]), np.concatenate([v[1] for v in parts]))
            for k, parts in splits.items()}
    mean = data["train"][0].mean(axis=0)
    std = data["train"][0].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    data = {k: (jnp.asarray(np.clip((x - mean) / std, -50, 50)), jnp.asarray(y)) for k, (x, y) in data.items()}

    key = jax.random.key(seed)
    model = eqx.nn.MLP(truth.shape[1], 1, hidden[0], depth=len(hidden), activation=jax.nn.leaky_relu, key=key)
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    x_train, y_train = data["train"]
    num_batches = max(len(x_train) // batch_size, 1)
    size = min(batch_size, len(x_train))

    @jax.jit
    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, len(x_train))[: num_batches * size].reshape(num_batches, size)

        def step(carry, index):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(lambda p: _bce(eqx.combine(p, static), x_train[index],
                                                            y_train[index]))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
        test_loss = _bce(eqx.combine(params, static), *data["test"])
        return params, opt_state, test_loss

    best = (np.inf, params, -1)
    for index in range(epochs):
        params, opt_state, test_loss = epoch(params, opt_state, jax.random.fold_in(key, index))
        if float(test_loss) < best[0]:
            best = (float(test_loss), params, index)
    model = eqx.combine(best[1], static)
    x_val, y_val = data["val"]
    logits = np.asarray(jax.vmap(model)(x_val)[:, 0])
    bce = float(_bce(model, x_val, y_val))
    return {"auc": roc_auc(np.asarray(y_val), logits), "jsd": (np.log(2) - bce) / np.log(2),
            "best_epoch": best[2], "num_validation": int(len(y_val))}
