"""The previous client side of the data plane, as a baseline measured in
the same run: the same Step requests, with the batch split in numpy (a
stable argsort of the batch, the sums as a sparse-matrix product, the rows
as one np.take) instead of the engine's passes, and without the padding
that puts the requests' arrays at aligned offsets. The benchmark's own code,
not the package's."""

from __future__ import annotations

import numpy as np

from monolith_jax.distributed.ps_data import shard_of
from monolith_jax.distributed.sharded_table import ShardedTable


class NumpySplit:
    """`ps_data.Split`'s interface, computed as the previous plane did."""

    def __init__(self, keys: np.ndarray, shards: int):
        self.size = keys.size
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        first = np.empty(sk.size, bool)
        first[:1] = True
        np.not_equal(sk[1:], sk[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        uniq = sk[starts]
        inverse = np.empty(keys.size, np.int64)
        inverse[order] = np.cumsum(first) - 1
        self._order, self._starts, self._by_shard = order, starts, None
        if shards == 1:
            self.grouped, self.rows_index = uniq, inverse
            self.bounds = np.array([0, uniq.size])
        else:
            owner = shard_of(uniq, shards)
            by_shard = np.argsort(owner, kind="stable")
            self.bounds = np.r_[0, np.cumsum(np.bincount(owner, minlength=shards))]
            self.grouped = uniq[by_shard]
            place = np.empty(uniq.size, np.int64)
            place[by_shard] = np.arange(uniq.size)
            self.rows_index = place[inverse]
            self._by_shard = by_shard
        self.keys = [self.grouped[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def same_keys(self, keys: np.ndarray) -> bool:
        return keys.size == self.size and np.array_equal(self.grouped[self.rows_index], keys)

    def summed(self, grads: np.ndarray):
        import scipy.sparse

        n, u = self.size, self.grouped.size
        if n == 0:
            return np.zeros((0, grads.shape[1]), np.float32), True
        m = scipy.sparse.csr_matrix((np.ones(n, np.float32), self._order.astype(np.int32),
                                     np.append(self._starts, n).astype(np.int32)), shape=(u, n))
        summed = np.ascontiguousarray(m @ grads, np.float32)
        if self._by_shard is not None:
            summed = np.take(summed, self._by_shard, axis=0)
        return summed, bool(np.all(np.isfinite(summed)))

    def parts(self, summed: np.ndarray) -> list:
        return [summed[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def rows(self, values: np.ndarray) -> np.ndarray:
        return np.take(values, self.rows_index, axis=0)


class PreviousShardedTable(ShardedTable):
    """A ShardedTable whose client side of a batch is the previous numpy one,
    and whose requests' arrays land where they fall (the shard copies the
    unaligned ones)."""

    split = NumpySplit
    pad = None
