"""EmbeddingTable behaviour through the Python API: jit, grad, vmap, ordering,
duplicate and edge-case ids, bad input, non-finite gradients, scale, threads."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monolith_jax.sparse import (
    SGD, Adagrad, Constant, EmbeddingTable, Keys, Normal, TableConfig, Zeros, hash_strings, key_words,
)


def make(dim=4, **kw):
    kw.setdefault("initializer", Normal(0.0, 0.1))
    kw.setdefault("optimizer", SGD(0.5))
    return EmbeddingTable(TableConfig("t", dim, **kw))


def test_rows_are_created_on_first_sight_and_stable():
    t = make()
    ids = np.array([5, 2**40 + 5, 5, -1], dtype=np.int64)
    rows = t.lookup_host(ids)
    assert rows.shape == (4, 4) and rows.dtype == np.float32
    assert len(t) == 3
    np.testing.assert_array_equal(rows[0], rows[2])
    assert not np.allclose(rows[0], rows[1])  # 2^40+5 is not 5 (no 32-bit truncation)
    np.testing.assert_array_equal(t.lookup_host(ids), rows)
    assert t.stats()["inserts"] == 3


def test_every_key_value_is_a_key():
    t = make(initializer=Zeros())
    edge = np.array([0, 1, 2**64 - 1, 2**63, 2**32 - 1, 2**32], dtype=np.uint64)
    t.apply_gradients_host(edge, np.arange(6 * 4, dtype=np.float32).reshape(6, 4))
    rows, found = t.find(edge)
    assert found.all() and len(t) == 6
    np.testing.assert_allclose(rows, -0.5 * np.arange(24, dtype=np.float32).reshape(6, 4))


def test_int64_negative_ids_alias_their_uint64_bit_pattern():
    t = make()
    a = t.lookup_host(np.array([-1], np.int64))
    b = t.lookup_host(np.array([2**64 - 1], np.uint64))
    np.testing.assert_array_equal(a, b)


def test_jit_step_lookup_grad_apply_in_one_program():
    t = make(dim=3, optimizer=Adagrad(0.1))
    ids = np.array([[1, 2], [2, 3]], dtype=np.uint64)
    keys = Keys.from_ids(ids)
    w_dense = jnp.ones((3,))

    @jax.jit
    def step(keys, w):
        rows = t.lookup(keys)                                   # (2, 2, 3)
        def loss(rows, w):
            logits = jnp.sum(rows.sum(axis=1) * w, axis=-1)
            return jnp.mean((logits - 1.0) ** 2)
        value, (g_rows, g_w) = jax.value_and_grad(loss, argnums=(0, 1))(rows, w)
        token = t.apply_gradients(keys, g_rows, step=7)
        return value, g_rows, token, t.lookup(keys, after=token)

    before = t.lookup_host(ids)
    value, g_rows, token, after = step(keys, w_dense)
    np.testing.assert_array_equal(np.asarray(token), [3, 0])  # 3 unique rows, none skipped
    # The reference: Adagrad on summed grads per unique id.
    acc = {k: np.full(3, 0.1, np.float32) for k in (1, 2, 3)}
    want = {k: before[np.argwhere(ids == k)[0][0], np.argwhere(ids == k)[0][1]].copy() for k in (1, 2, 3)}
    g = np.asarray(g_rows)
    for k in (1, 2, 3):
        gs = g[ids == k].sum(axis=0)
        acc[k] += gs * gs
        want[k] -= 0.1 * gs / np.sqrt(acc[k] + 1e-7)
    got, _ = t.find(np.array([1, 2, 3], np.uint64))
    np.testing.assert_allclose(got, np.stack([want[k] for k in (1, 2, 3)]), rtol=1e-5)
    # The lookup ordered after the apply saw the new rows.
    np.testing.assert_allclose(np.asarray(after)[0, 1], want[2], rtol=1e-5)
    assert (t.dump()["last_update"] == 7).all()


def test_training_lowers_the_loss_through_grad():
    """jax.grad of a loss over looked-up rows reaches the table."""
    t = make(dim=2, initializer=Zeros(), optimizer=Adagrad(0.5))
    ids = np.arange(50, dtype=np.uint64)
    target = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32)

    @jax.jit
    def step(keys, target):
        rows = t.lookup(keys)
        loss, g = jax.value_and_grad(lambda r: jnp.sum((r - target) ** 2))(rows)
        return loss, t.apply_gradients(keys, g)

    keys = Keys.from_ids(ids)
    losses = [float(step(keys, target)[0]) for _ in range(60)]
    assert losses[-1] < 0.01 * losses[0]


def test_lax_scan_threads_the_order_token():
    t = make(dim=1, initializer=Zeros(), optimizer=SGD(1.0))
    keys = Keys.from_ids(np.array([9], np.uint64))

    @jax.jit
    def run(keys):
        def body(token, _):
            row = t.lookup(keys, after=token)
            token = t.apply_gradients(keys, -jnp.ones_like(row), after=row)  # row += 1
            return token, row[0, 0]
        _, seen = jax.lax.scan(body, jnp.zeros((2,), jnp.int32), None, length=5)
        return seen

    np.testing.assert_array_equal(np.asarray(run(keys)), [0, 1, 2, 3, 4])


def test_int32_jax_ids_and_vmap():
    t = make(dim=2)
    ids = np.array([[3, -4], [5, 3]], np.int32)
    want = t.lookup_host(ids.astype(np.int64))
    got = jax.jit(t.lookup)(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(got), want)
    vm = jax.vmap(lambda i: t.lookup(i))(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(vm), want)
    np.testing.assert_array_equal(np.asarray(key_words(jnp.asarray([-1], jnp.int32))), [[2**32 - 1, 2**32 - 1]])


def test_empty_batches():
    t = make()
    assert t.lookup_host(np.zeros((0,), np.uint64)).shape == (0, 4)
    assert t.apply_gradients_host(np.zeros((0,), np.uint64), np.zeros((0, 4), np.float32)) == (0, 0)
    assert np.asarray(jax.jit(t.lookup)(Keys.from_ids(np.zeros((0,), np.uint64)))).shape == (0, 4)
    tok = t.apply_gradients(Keys.from_ids(np.zeros((0,), np.uint64)), jnp.zeros((0, 4)))
    np.testing.assert_array_equal(np.asarray(tok), [0, 0])
    assert len(t) == 0


def test_non_finite_gradient_rows_are_skipped_and_counted():
    t = make(initializer=Constant(1.0))
    ids = np.array([1, 2, 3, 2], np.uint64)
    g = np.ones((4, 4), np.float32)
    g[0, 2] = np.nan
    g[3, 0] = np.inf
    assert t.apply_gradients_host(ids, g) == (1, 2)
    rows, _ = t.find(ids[:3])
    np.testing.assert_array_equal(rows[0], 1.0)   # id 1: NaN, untouched
    np.testing.assert_array_equal(rows[1], 1.0)   # id 2: Inf in its sum, untouched
    np.testing.assert_array_equal(rows[2], 0.5)   # id 3: stepped
    assert t.stats()["nonfinite_skipped"] == 2


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t: t.lookup_host(np.array([1.5])), TypeError, "integers"),
        (lambda t: t.lookup_host(np.array([True])), TypeError, "integers"),
        (lambda t: t.lookup(jnp.array([1.0])), TypeError, "int32 or uint32"),
        (lambda t: t.apply_gradients_host([1, 2], np.ones((2, 4), np.float64)), TypeError, "float32"),
        (lambda t: t.apply_gradients_host([1, 2], np.ones((3, 4), np.float32)), ValueError, r"\(2, 4\)"),
        (lambda t: t.apply_gradients_host([1, 2], np.ones((2, 5), np.float32)), ValueError, "dim"),
        (lambda t: t.apply_gradients_host([1], np.ones((1, 4), np.float32), learning_rate=-1.0), ValueError, "learning_rate"),
        (lambda t: t.apply_gradients_host([1], np.ones((1, 4), np.float32), step=-3), ValueError, "step"),
        (lambda t: t.apply_gradients(Keys.from_ids([1]), jnp.ones((1, 4), jnp.bfloat16)), TypeError, "float32"),
        (lambda t: t.apply_gradients_host([1], [[1.0, 2.0, 3.0, 4.0]]), TypeError, "array"),
        (lambda t: t.load({"keys": np.array([1], np.uint64)}), ValueError, "lacks"),
    ],
)
def test_bad_input_is_refused_in_python_and_loses_nothing(call, error, match):
    t = make()
    t.apply_gradients_host([7], np.ones((1, 4), np.float32))
    before = t.dump()
    with pytest.raises(error, match=match):
        call(t)
    after = t.dump()
    for k in before:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="dim"):
        TableConfig("x", 0)
    with pytest.raises(ValueError, match="name"):
        TableConfig("", 4)
    with pytest.raises(ValueError, match="learning_rate"):
        SGD(0.0)
    with pytest.raises(TypeError, match="optimizer"):
        TableConfig("x", 4, optimizer="adam")


def test_closed_table_fails_cleanly_inside_a_compiled_program():
    t = make()
    f = jax.jit(lambda k: t.lookup(k))
    k = Keys.from_ids(np.array([1], np.uint64))
    f(k).block_until_ready()
    t.close()
    with pytest.raises(Exception, match="closed"):
        f(k).block_until_ready()
    with pytest.raises(RuntimeError, match="closed"):
        t.lookup_host([1])


def test_dump_and_load_round_trip_everything():
    t = make(optimizer=Adagrad(0.1))
    ids = np.random.default_rng(0).integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True)
    t.lookup_host(ids)
    t.apply_gradients_host(ids[:3000], np.ones((3000, 4), np.float32), step=11)
    d = t.dump()
    assert d["keys"].dtype == np.uint64 and d["slots"].shape == (len(t), 4)
    u = make(optimizer=Adagrad(0.1))
    u.load(d)
    e = u.dump()
    order_d, order_e = np.argsort(d["keys"]), np.argsort(e["keys"])
    for k in ("keys", "values", "slots", "last_update", "update_count", "touched"):
        np.testing.assert_array_equal(d[k][order_d], e[k][order_e])
    np.testing.assert_array_equal(d["filter"], e["filter"])
    assert d["clock"] == e["clock"] == 11
    # The loaded table trains on exactly as the original does.
    t.apply_gradients_host(ids[:10], np.ones((10, 4), np.float32))
    u.apply_gradients_host(ids[:10], np.ones((10, 4), np.float32))
    np.testing.assert_array_equal(t.find(ids[:10])[0], u.find(ids[:10])[0])


@pytest.mark.parametrize("field", ["values", "slots"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_refuses_non_finite_values_or_slots_and_keeps_the_table(field, bad):
    t = make(optimizer=Adagrad(0.1))
    ids = np.arange(50, dtype=np.uint64)
    t.lookup_host(ids)
    t.apply_gradients_host(ids[:20], np.ones((20, 4), np.float32), step=3)
    dump = t.dump()
    target = make(optimizer=Adagrad(0.1))
    target.apply_gradients_host([7, 8], np.ones((2, 4), np.float32), step=1)
    before = target.dump()
    dump[field][[4, 9, 9], [0, 1, 3]] = bad
    with pytest.raises(ValueError, match=rf"table 't': dump holds {3 if field == 'values' else 0} non-finite "
                                         rf"values and {3 if field == 'slots' else 0} non-finite optimizer slots "
                                         r"in 2 of its 50 rows; nothing was loaded"):
        target.load(dump)
    with pytest.raises(ValueError, match="non-finite"):
        target.check_dump(dump)
    with pytest.raises(ValueError, match="non-finite .* nothing was loaded"):   # the engine's own check
        target._native.load(dump["keys"], dump["values"], dump["slots"].reshape(-1), dump["last_update"],
                            dump["update_count"], dump["touched"], dump["filter"], dump["clock"])
    after = target.dump()
    for k in before:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


def test_check_dump_refuses_what_load_would_and_changes_nothing():
    t = make(optimizer=Adagrad(0.1))
    t.lookup_host(np.arange(5, dtype=np.uint64))
    good = t.dump()
    t.check_dump(good)
    other = make(optimizer=SGD(0.1))                        # no slots: the dump's do not fit
    with pytest.raises(ValueError, match=r"table 't': dump slots must be float32\(5, 0\)"):
        other.check_dump(good)
    assert len(other) == 0
    dup = {**good, "keys": np.array([1, 1, 2, 3, 4], np.uint64)}
    with pytest.raises(ValueError, match="not unique"):
        t.check_dump(dup)


def test_a_million_keys():
    t = make(dim=2, initializer=Zeros())
    keys = np.random.default_rng(1).integers(0, 2**64 - 1, 1_200_000, dtype=np.uint64, endpoint=True)
    keys = np.unique(keys)
    for i in range(0, keys.size, 200_000):
        t.lookup_host(keys[i:i + 200_000])
    assert len(t) == keys.size
    g = np.tile(keys[:, None].astype(np.float32) * 0 + 1, (1, 2))
    t.apply_gradients_host(keys, g.astype(np.float32), learning_rate=2.0)
    rows, found = t.find(keys)
    assert found.all()
    np.testing.assert_array_equal(rows, -2.0)
    s = t.stats()
    assert s["rows"] == keys.size and s["overhead_bytes_per_row"] < 40
    missing, found = t.find(np.array([keys.max() - 1 if keys.max() - 1 not in keys else 0], np.uint64))
    assert t.erase(keys[:1000]) == 1000 and len(t) == keys.size - 1000


def test_concurrent_lookups_never_see_a_half_updated_row():
    """Rows stay constant across their elements under uniform updates; a torn
    read would show two different values inside one row."""
    dim = 64
    t = make(dim=dim, initializer=Constant(0.0), optimizer=SGD(1.0))
    keys = np.arange(20_000, dtype=np.uint64)
    t.lookup_host(keys)
    stop = threading.Event()
    errors = []

    def reader(jitted):
        f = jax.jit(lambda k: t.lookup(k))
        wk = Keys.from_ids(keys)
        while not stop.is_set():
            rows = np.asarray(f(wk)) if jitted else t.lookup_host(keys)
            spread = rows.max(axis=1) - rows.min(axis=1)
            if spread.max() != 0:
                errors.append(int(np.argmax(spread)))
                return

    def writer():
        rng = np.random.default_rng(0)
        for i in range(60):
            batch = rng.choice(keys, 8192)
            g = np.repeat(rng.standard_normal((8192, 1)).astype(np.float32), dim, axis=1)
            t.apply_gradients_host(batch, g, step=i)
            t.dump()  # exports run beside lookups too

    threads = [threading.Thread(target=reader, args=(j,)) for j in (False, True, False)]
    for th in threads:
        th.start()
    writer()
    stop.set()
    for th in threads:
        th.join()
    assert not errors
    assert t.stats()["updates"] > 0


def test_concurrent_applies_and_inserts_from_many_threads():
    t = make(dim=2, initializer=Zeros(), optimizer=SGD(1.0))
    n_threads, per = 4, 30
    batches = [[np.random.default_rng(100 * s + i).integers(0, 5000, 4096).astype(np.uint64)
                for i in range(per)] for s in range(n_threads)]

    def work(mine):
        for ids in mine:
            t.lookup_host(ids)
            t.apply_gradients_host(ids, -np.ones((ids.size, 2), np.float32))

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # Each apply adds the id's occurrences in the batch and counts one update.
    every = np.concatenate([ids for mine in batches for ids in mine])
    updates = np.zeros(5000, np.int64)
    for mine in batches:
        for ids in mine:
            updates[np.unique(ids).astype(np.int64)] += 1
    d = t.dump()
    k = d["keys"].astype(np.int64)
    np.testing.assert_array_equal(d["values"][:, 0], np.bincount(every.astype(np.int64), minlength=5000)[k])
    np.testing.assert_array_equal(d["update_count"], updates[k])


def test_hash_strings_is_stable_blake2b():
    import hashlib
    got = hash_strings(["user:42", "", "日本"])
    want = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
            for s in ["user:42", "", "日本"]]
    assert got.dtype == np.uint64 and got.tolist() == want
    assert hash_strings([b"user:42"])[0] == got[0]


def test_lookup_host_into_a_reused_buffer():
    t = make()
    ids = np.array([[1, 2], [3, 1]], np.uint64)
    out = np.full((2, 2, 4), np.nan, np.float32)
    assert t.lookup_host(ids, out=out) is out
    np.testing.assert_array_equal(out, t.lookup_host(ids))
    with pytest.raises(ValueError, match="out must be"):
        t.lookup_host(ids, out=np.zeros((2, 2, 4), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        t.lookup_host(ids, out=np.zeros((4, 4), np.float32))


def test_memory_kept_between_dumps_is_counted_and_released():
    import gc

    table = EmbeddingTable(TableConfig("kept", 8, Zeros(), SGD(0.1)))
    table.lookup_host(np.arange(1, 5001, dtype=np.uint64))
    assert table.stats()["bytes_dump_kept"] == 0
    dump = table.dump(reuse_buffers=True)
    values = dump["values"].nbytes
    assert table.stats()["bytes_dump_kept"] < values   # lent to the arrays while they live
    del dump
    gc.collect()
    kept = table.stats()["bytes_dump_kept"]
    assert kept >= values                               # back in the table for the next dump
    table.dump(reuse_buffers=False)
    assert table.stats()["bytes_dump_kept"] == kept     # a dump without reuse leaves it be
    table.release_dump_buffers()
    assert table.stats()["bytes_dump_kept"] == 0


def test_prepared_dump_memory_is_what_the_next_dump_copies_into():
    table = EmbeddingTable(TableConfig("prep", 8, Normal(0.0, 0.1), Adagrad(0.1)))
    keys = np.arange(1, 3001, dtype=np.uint64)
    table.apply_gradients_host(keys, np.ones((3000, 8), np.float32))
    expected = table.dump()
    table.prepare_dump_buffers()                     # 3000 rows and 1/8 more
    kept = table.stats()["bytes_dump_kept"]
    # keys, values, slots, last_update, update_count, touched: 8 + 32 + 32 + 4 + 4 + 1 bytes a row
    assert kept >= 3375 * 81
    table.prepare_dump_buffers(100)                  # smaller than what is kept: nothing changes
    assert table.stats()["bytes_dump_kept"] == kept
    table.lookup_host(np.arange(3001, 3201, dtype=np.uint64))   # grown, within the 1/8
    dump = table.dump(reuse_buffers=True)
    assert table.stats()["bytes_dump_kept"] < kept   # the prepared memory, lent to the arrays
    got = dict(zip(dump["keys"].tolist(), dump["values"]))
    assert len(got) == 3200
    for k, v in zip(expected["keys"].tolist(), expected["values"]):
        np.testing.assert_array_equal(got[k], v)
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="rows must be an int"):
            table.prepare_dump_buffers(bad)
