"""``DistributedSampler``: which samples each process of a data-parallel run trains on.

Pure NumPy, no MPI: a process needs only its rank and the world size, and every process computes
the same permutation from the same seed and epoch, so no order is ever sent between them.
"""
import numbers

import numpy as np


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"DistributedSampler: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


class DistributedSampler:
    """The indices of one process's share of a dataset of ``n`` samples, epoch by epoch, with the
    rule of PyTorch's ``DistributedSampler``.

    Each epoch every process draws the same permutation of ``range(n)`` (from ``seed`` and the
    epoch that ``set_epoch`` sets; ``shuffle=False``: ``range(n)`` itself). When ``world_size``
    does not divide ``n`` it is made a multiple of it, so that every process has the same number
    of samples and so takes the same number of steps:

    - ``drop_last=False`` (default): padded by repeating its first indices (``n = 10``, world 4:
      12 positions, the first two samples seen twice);
    - ``drop_last=True``: its last ``n % world_size`` positions dropped (10 -> 8);
    - ``even=False``: neither; shards differ in length by at most one and no sample is repeated
      or left out. For evaluation, where sums are all-reduced; not for training, where a process
      with fewer batches would stop taking part in the all-reduce the others wait in.

    Process ``rank`` then takes positions ``rank, rank + w, rank + 2w, ...`` of that order
    (``global_indices()``). Batch k of a loader of batch size B over this sampler therefore holds,
    across the processes, exactly positions ``[k*w*B, (k+1)*w*B)`` of the global order: the batch
    one process would take at batch size ``w*B``.

    ``n`` may be a dataset (its ``len()`` is taken). ``world_size`` and ``rank`` default to those
    of the group of ``minicnn.distributed.init()``. Iterating gives this process's indices as
    Python ints; ``len()`` is how many there are. ``minicnn.fit`` calls ``set_epoch(epoch)`` at
    the start of every epoch; a loop of your own must call it too, or every epoch repeats the
    first one's order.
    """

    def __init__(self, n, world_size=None, rank=None, shuffle=True, seed=0, drop_last=False,
                 even=True):
        if not isinstance(n, numbers.Integral):
            if not hasattr(n, "__len__"):
                raise TypeError(f"DistributedSampler: expected a sample count or a dataset, "
                                f"got {type(n).__name__}")
            n = len(n)
        if world_size is None or rank is None:
            from .comm import get_group
            group = get_group()
            world_size = group.size if world_size is None else world_size
            rank = group.rank if rank is None else rank
        self.n = _check_int("n", n, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"DistributedSampler: rank must be in [0, {self.world_size}), "
                             f"got {self.rank}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle, self.drop_last, self.even = bool(shuffle), bool(drop_last), bool(even)
        if self.drop_last and not self.even:
            raise ValueError("DistributedSampler: drop_last=True makes the shards even; it cannot "
                             "go with even=False")
        if self.drop_last and self.n < self.world_size:
            raise ValueError(f"DistributedSampler: drop_last=True with {self.n} samples for "
                             f"{self.world_size} processes leaves none to any of them")
        self.epoch = 0

    def set_epoch(self, epoch):
        """Draw the order of ``epoch`` on the next iteration (the same on every process)."""
        self.epoch = _check_int("epoch", epoch, 0)

    @property
    def total_size(self):
        """Positions of the global order: ``n`` made a multiple of the world size (even), or n."""
        w = self.world_size
        if not self.even:
            return self.n
        return (self.n // w if self.drop_last else -(-self.n // w)) * w

    def __len__(self):
        """This process's number of samples."""
        w, total = self.world_size, self.total_size
        return (total - self.rank + w - 1) // w if total > self.rank else 0

    def permutation(self):
        """The epoch's order of ``range(n)``, before padding or dropping: int64 (n,)."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        # Its own generator, from (seed, epoch) alone: the processes agree without talking, and
        # minicnn's generator (init, dropout, augmentation) is left as it is.
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).astype(np.int64)

    def global_indices(self):
        """The epoch's order of all processes' samples together, padded or cut to
        ``total_size``: int64 (total_size,). Process r takes positions r, r + w, ..."""
        order = self.permutation()
        total = self.total_size
        if total <= self.n:
            return order[:total]
        # padded: n >= 1 here (n = 0 gives total 0); padding longer than n repeats it again
        return np.tile(order, -(-total // self.n))[:total]

    def indices(self):
        """This process's indices for the epoch: int64 (len(self),)."""
        return self.global_indices()[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __repr__(self):
        rule = ("uneven" if not self.even else "drop_last" if self.drop_last else "padded")
        return (f"DistributedSampler(n={self.n}, rank={self.rank} of {self.world_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, {rule}, epoch={self.epoch})")
