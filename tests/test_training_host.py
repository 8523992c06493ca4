"""The host-tables step (lookup and apply from host code around a jitted dense
step: the accelerator and remote-table path) trains exactly as the in-jit step."""

import jax
import numpy as np

from monolith_jax.examples.movielens.loop import movielens_trainer
from tests.serving.test_predictor import make_batch


def test_host_step_equals_the_in_jit_step():
    a = movielens_trainer(dim=4, hidden=(8,), out=lambda *x, **k: None)
    b = movielens_trainer(dim=4, hidden=(8,), out=lambda *x, **k: None)
    rng = np.random.default_rng(0)
    for step in range(5):
        batch = make_batch(a, rng)
        la = a.train_step(batch, stamp=step)
        lb = b.train_step_host(batch, stamp=step)
        np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params) + jax.tree.leaves(a.opt_state),
                    jax.tree.leaves(b.params) + jax.tree.leaves(b.opt_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    da, db = a.tables["ids"].dump(), b.tables["ids"].dump()
    oa, ob = np.argsort(da["keys"]), np.argsort(db["keys"])
    np.testing.assert_array_equal(da["keys"][oa], db["keys"][ob])
    np.testing.assert_allclose(da["values"][oa], db["values"][ob], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(da["slots"][oa], db["slots"][ob], rtol=1e-6, atol=1e-7)
    assert a.step_count == b.step_count == 5 and a.examples == b.examples


def test_host_step_checks_the_model_output_and_its_inputs():
    import pytest
    from flax import nnx

    from tests.test_models_training import _Logits, _small_batches, _small_trainer
    from monolith_jax.models import DeepFM

    batch = _small_batches(500)[0]
    a = _small_trainer(model=_Logits("b"), dim=4)
    b = _small_trainer(model=_Logits("b1"), dim=4)
    for _ in range(3):
        np.testing.assert_allclose(float(a.train_step_host(batch)), float(b.train_step_host(batch)), rtol=1e-6)
    np.testing.assert_allclose(a.predict(batch), b.predict(batch), rtol=1e-6)
    bad = _small_trainer(model=_Logits("bb"), dim=4)
    with pytest.raises(ValueError, match=r"_Logits returned logits of shape \(250, 250\); expected \(250,\)"):
        bad.train_step_host(batch)
    assert bad.step_count == 0
    narrow = _small_trainer(model=DeepFM(["user", "item"], 4, 1, (8,), rngs=nnx.Rngs(0)), dim=4)
    with pytest.raises(ValueError, match=r"DeepFM: feature 'user' reads a table with rows of width 4; DeepFM "
                                         r"needs rows of width embed_dim \+ 1 = 5"):
        narrow.train_step_host(batch)
