"""The README's main job, end to end on a small run."""

from monolith_jax import demo


def test_demo_learns_the_hidden_clicks(capsys):
    r = demo.main(["--examples", "60000", "--users", "2000", "--items", "200", "--epochs", "4", "--batch", "1024"])
    out = capsys.readouterr().out
    assert "test AUC" in out and "examples" in out
    assert abs(r["auc_before"] - 0.5) < 0.05
    assert r["auc_after"] > r["auc_before"] + 0.08
    assert r["loss_last"] < r["loss_first"]
    assert r["user_rows"] >= 1000
