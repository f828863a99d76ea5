"""Data-parallel training over many processes: MPI (mpi4py) on CPUs, NCCL on GPUs.

    mpiexec -n 2 python examples/mnist.py --distributed

Each process holds a replica of the model and trains on its own share of every batch
(``DistributedSampler``); after backward, ``DistributedDataParallel`` sums the gradients over
the processes, so every replica takes the same optimizer step: the step of one process on the
union of the batches. ``init()`` joins the run (rank, world size, the GPU and NCCL
communicator); ``fit`` given a wrapped model prints and writes checkpoints on rank 0 only and
all-reduces its metrics. mpi4py is imported by ``init()``, not here: ``pip install
"minicnn[mpi]"``. docs/distributed.md explains the method and shows the measurements.
"""
from .comm import MPI_INSTALL_HINT, ProcessGroup, get_group, init, is_initialized
from .ddp import DistributedDataParallel
from .sampler import DistributedSampler

__all__ = ["init", "is_initialized", "get_group", "ProcessGroup", "DistributedDataParallel",
           "DistributedSampler", "MPI_INSTALL_HINT"]
