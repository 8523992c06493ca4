"""The dense-step benchmark, small, through its command line (a run folder;
the committed results stay as they are): the three steps, the in-process
variants, one XLA configuration in a worker of its own (two host devices),
and the loss curves; the one-pass FM against the two-sum one."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.dense_step import arms, main as ds_main


def test_the_steps_variants_and_a_configuration_in_one_run(runs, capsys):
    r = ds_main.main(["--batch", "128", "--hidden", "16", "--rounds", "2", "--steps", "2", "--warmup", "1",
                      "--static-rows", "1024", "--curve-steps", "4", "--configs", "base", "two_devices"])
    assert r["info"]["two_devices"]["devices"] == 2 and r["info"]["base"]["devices"] == 1
    base = r["examples_per_s_rounds"]["base"]
    assert {"full", "static", "dense", "full_bf16", "dense_bf16", "full_donate"} <= set(base)
    assert all(len(v) == 2 and min(v) > 0 for c in r["examples_per_s_rounds"].values() for v in c.values())
    losses = r["loss_per_step"]["base"]
    # the same batches and init: f32 and its donated twin take the same steps
    np.testing.assert_allclose(losses["full_donate"], losses["full"], rtol=1e-6)
    np.testing.assert_allclose(losses["dense_donate"], losses["dense"], rtol=1e-6)
    # two devices: the same step up to the order of the sums
    np.testing.assert_allclose(r["loss_per_step"]["two_devices"]["dense"], losses["dense"], rtol=1e-4)
    assert set(r["curves"]) == {"f32", "f32_seed1", "bf16", "fm1"} and all(len(v) == 4 for v in r["curves"].values())
    printed = capsys.readouterr().out
    assert "examples/s" in printed and "x base" in printed and "loss curves" in printed
    folder = runs.folder("dense_step", printed)
    assert json.loads((folder / "results.json").read_text())["examples_per_s"] == r["examples_per_s"]


def test_one_pass_fm_is_the_two_sum_fm():
    e = np.random.default_rng(0).normal(size=(9, 26, 16)).astype(np.float32)
    ref = 0.5 * ((e.astype(np.float64).sum(1) ** 2) - (e.astype(np.float64) ** 2).sum(1)).sum(1)
    for form in arms.FM_FORMS:
        np.testing.assert_allclose(arms.fm_term(jnp.asarray(e), form), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="fm must be one of"):
        arms.W2Model(4, (4,), fm="three_sums", rngs=None)


def test_a_configuration_other_than_base_first_is_refused():
    with pytest.raises(SystemExit):
        ds_main.main(["--configs", "no_ynnpack", "base"])
