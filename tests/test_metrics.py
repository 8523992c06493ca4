import numpy as np
import pytest

from monolith_jax.metrics import auc, log_loss


def _slow_auc(labels, scores):
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels * 0.3, 1)  # many ties
    assert auc(labels, scores) == pytest.approx(_slow_auc(labels, scores), abs=1e-12)
    assert auc([1, 0], [0.9, 0.1]) == 1.0 and auc([0, 1], [0.9, 0.1]) == 0.0
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_log_loss():
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    with pytest.raises(ValueError):
        auc([1, 0, 1], [0.1, 0.2])
