"""`Job` and `load_job`: one definition every process runs, refused with a
message naming what is wrong."""

import sys
import textwrap

import pytest

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseFeature


def tiny_model(rngs):
    raise AssertionError("these tests never build the model")


def make(**kw):
    base = dict(sparse=[SparseFeature("user", "ids")], tables=[mj.TableConfig("ids", 4)], model=tiny_model)
    return mj.Job(**{**base, **kw})


def test_a_job_checks_its_parts():
    with pytest.raises(ValueError, match="feature 'item' reads table 'items'"):
        make(sparse=[SparseFeature("item", "items")])
    with pytest.raises(ValueError, match="used twice"):
        make(sparse=[SparseFeature("user", "ids")], dense=[DenseFeature("user")])
    with pytest.raises(ValueError, match="no sparse features"):
        make(sparse=[])
    with pytest.raises(TypeError, match="factory"):
        make(model=object())
    with pytest.raises(ValueError, match="batch_size"):
        make(batch_size=0)
    with pytest.raises(ValueError, match="negative_rate"):
        mj.LabelRule(negative_rate=0.0)
    with pytest.raises(ValueError, match="at least one action type"):
        mj.LabelRule(positive=())
    with pytest.raises(ValueError, match="time_unit"):
        mj.LogSpec("ts", {"click": "c"}, time_unit="h")
    with pytest.raises(ValueError, match="include none of the label rule's positive types"):
        make(labels=mj.LabelRule(positive=("click",)), log=mj.LogSpec("ts", {"rate": "rating"}))
    job = make(seed=3)
    assert job.table_configs()[0].seed == 3 and job.table_configs(5)[0].seed == 5


def test_load_job_finds_a_job_or_a_function_returning_one(tmp_path, monkeypatch):
    (tmp_path / "userjob.py").write_text(textwrap.dedent("""
        import monolith_jax as mj
        from monolith_jax.features import SparseFeature
        job = mj.Job(sparse=[SparseFeature("u", "t")], tables=[mj.TableConfig("t", 4)], model=lambda rngs: None,
                     name="mine")
        def make():
            return job
        not_a_job = 42
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert mj.load_job("userjob:job").name == "mine"
    assert mj.load_job("userjob:make").name == "mine"
    with pytest.raises(mj.JobError, match="not a monolith_jax.Job"):
        mj.load_job("userjob:not_a_job")
    with pytest.raises(mj.JobError, match="has no attribute 'nothing'"):
        mj.load_job("userjob:nothing")
    with pytest.raises(mj.JobError, match="cannot import module 'no_such_module'"):
        mj.load_job("no_such_module:job")
    with pytest.raises(mj.JobError, match="MODULE:NAME"):
        mj.load_job("userjob")
