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


def test_a_job_with_heads_takes_one_label_rule_per_head():
    heads = (mj.Head("click"), mj.Head("buy", missing="mask"), mj.Head("watch", loss="squared"))
    rules = {"click": mj.LabelRule(positive=("click",), window_s=30),
             "buy": mj.LabelRule(positive=("buy",), given="click", negative_rate=0.5),
             "watch": mj.LabelRule(value_of="watch", default=0.0)}
    job = make(heads=heads, labels=rules, log=mj.LogSpec("ts", {"click": "c", "buy": "b", "watch": "w"}))
    assert job.label_rules() == rules
    assert make().labels == mj.LabelRule() and make().label_rules() is None   # one label, as before
    assert make(heads=heads).labels is None   # heads without stream rules: trained from files
    one = make(heads=heads[:1], labels=mj.LabelRule(positive=("click",)))
    assert one.label_rules() == {"click": mj.LabelRule(positive=("click",))}
    with pytest.raises(ValueError, match=r"single LabelRule cannot label the heads \['click', 'buy', 'watch'\]"):
        make(heads=heads, labels=mj.LabelRule())
    with pytest.raises(ValueError, match=r"heads without a rule: \['watch'\]; rules naming no head: \['cart'\]"):
        make(heads=heads, labels={"click": rules["click"], "buy": rules["buy"], "cart": mj.LabelRule()})
    with pytest.raises(ValueError, match="need heads of those names"):
        make(labels={"click": mj.LabelRule()})
    with pytest.raises(ValueError, match="'buy' is given 'clik', which is not among"):
        make(heads=heads, labels={**rules, "buy": mj.LabelRule(positive=("buy",), given="clik")})
    with pytest.raises(ValueError, match=r"include none of the action types \['watch'\] of label 'watch'"):
        make(heads=heads, labels=rules, log=mj.LogSpec("ts", {"click": "c", "buy": "b"}))


def test_the_joiner_takes_a_multi_head_jobs_rules_or_label_flags():
    import argparse

    from monolith_jax.stream.joiner import add_join_args, config_from_args, pick_codec, warn_if_unlabelled
    from tests.jobs import shop_tasks

    p = argparse.ArgumentParser()
    add_join_args(p)
    config = config_from_args(p.parse_args([]), shop_tasks.job)
    assert dict(config.labels) == shop_tasks.LABELS and pick_codec(config, None) == "native"
    with pytest.raises(ValueError, match="codec must be one of native, python"):
        pick_codec(config, "rust")
    with pytest.raises(ValueError, match="--window describes a single label"):
        config_from_args(p.parse_args(["--window", "60"]), shop_tasks.job)
    flags = config_from_args(p.parse_args(["--label", "click:positive=click,window=60,rate=0.5",
                                           "--label", "buy:positive=buy,given=click"]), shop_tasks.job)
    assert dict(flags.labels) == {"click": mj.LabelRule(positive=("click",), window_s=60, negative_rate=0.5),
                                  "buy": mj.LabelRule(positive=("buy",), given="click")}
    single = config_from_args(p.parse_args(["--window", "60"]))
    assert not single.labels and single.window_s == 60 and pick_codec(single, None) == "native"
    with pytest.raises(ValueError, match=r"has heads \['click', 'x'\] but no label rules"):
        config_from_args(p.parse_args([]), make(heads=(mj.Head("click"), mj.Head("x")), labels=None))
    line = warn_if_unlabelled({"actions": 10, "click:positives": 4, "buy:positives": 0}, config)
    assert "label 'buy' was never set" in line and "'click'" not in line
    assert warn_if_unlabelled({"actions": 10, "click:positives": 4, "buy:positives": 1}, config) is None
