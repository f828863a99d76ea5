"""The processes of a run and how they talk: MPI (mpi4py) between hosts' memory, NCCL
(``cupy.cuda.nccl``) between GPUs.

``init()`` reads the world size and this process's rank from ``MPI.COMM_WORLD``; on a GPU it
picks the device (node-local rank modulo the device count) and creates an NCCL communicator from
a unique id that rank 0 makes and broadcasts over MPI. The ``ProcessGroup`` it returns
broadcasts and sums arrays in place: NumPy arrays through MPI, CuPy arrays through NCCL on the
current stream (nothing read back to the host). Every call of ``cupy.cuda.nccl`` here follows
``cupy_backends/cuda/libs/nccl.pyx`` of CuPy 13 and 14 (see ``_NcclCalls``).

An exception that reaches the top of any process prints its traceback with the rank and calls
``MPI.COMM_WORLD.Abort(1)``: the other processes, perhaps waiting in an all-reduce for the one
that failed, end too, and ``mpiexec`` exits non-zero instead of hanging.
"""
import importlib
import os
import sys
import traceback

import numpy as np

from ..backend import Device, device as _device, get_array_module

MPI_INSTALL_HINT = 'pip install "minicnn[mpi]"'

_group = None


def _mpi():
    """mpi4py's MPI module (importing it initialises MPI), or ImportError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"minicnn.distributed needs mpi4py and an MPI library ({e}); install "
                          f"both with: {MPI_INSTALL_HINT}") from e
    return MPI


class _OneProcess:
    """The part of an mpi4py communicator that a ``ProcessGroup`` uses, for a world of one
    process without MPI (``init(mpi=False)``): collectives return their input."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def bcast(self, obj, root=0):
        return obj

    def Bcast(self, buf, root=0):
        pass

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root=0):
        return [obj]

    def Barrier(self):
        pass

    def Abort(self, code=1):
        os._exit(code)


class _NcclCalls:
    """The NCCL calls of a ``ProcessGroup``, as ``cupy_backends/cuda/libs/nccl.pyx`` defines them
    in CuPy 13 and 14 (checked against v13.0.0, v13.6.0, v14.0.0 and v14.2.0):

    - ``get_unique_id()``: a tuple of 128 ints in CuPy 13, bytes in CuPy 14. Passed on untouched
      (pickled by ``comm.bcast``): ``NcclCommunicator(int ndev, tuple commId, int rank)`` in 13,
      ``(int ndev, bytes commId, int rank, NcclConfig config=None)`` in 14.
    - ``allReduce(intptr_t sendbuf, intptr_t recvbuf, size_t count, int datatype, int op,
      intptr_t stream)``, ``bcast(intptr_t buff, size_t count, int datatype, int root,
      intptr_t stream)``: device pointers as ints (``array.data.ptr``), the element count, the
      module's ``NCCL_FLOAT16/32/64``, ``NCCL_INT32/64`` and ``NCCL_SUM`` constants (the same
      numbers in both: ``nccl.pxd``'s ``cpdef enum``), and the stream to enqueue on,
      as an int: CuPy's current stream (``cupy.cuda.get_current_stream().ptr``), where the
      elementwise work before and after runs, so no synchronisation is needed. In place:
      sendbuf == recvbuf, which NCCL allows.
    """

    def __init__(self, world, rank, mpi_comm):
        import cupy
        try:
            nccl = importlib.import_module("cupy.cuda.nccl")
        except ImportError as e:
            raise ImportError(f"minicnn.distributed: CuPy's NCCL module cannot be imported ({e})"
                              ) from e
        if not getattr(nccl, "available", True):
            major = cupy.cuda.runtime.runtimeGetVersion() // 1000
            raise ImportError(f"minicnn.distributed: CuPy found no NCCL library, which "
                              f"device='cuda' needs to sum gradients between GPUs; install it "
                              f"with: pip install nvidia-nccl-cu{major}")
        self.nccl, self.cupy = nccl, cupy
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(world, uid, rank)
        self.dtypes = {np.dtype(np.float16): nccl.NCCL_FLOAT16,
                       np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int32): nccl.NCCL_INT32,       # buffers such as BatchNorm's
                       np.dtype(np.int64): nccl.NCCL_INT64}       # num_batches_tracked

    def _args(self, where, array):
        code = self.dtypes.get(np.dtype(array.dtype))
        if code is None:
            raise TypeError(f"ProcessGroup.{where}: NCCL carries float16/32/64 and int32/64 "
                            f"arrays here, got {array.dtype}")
        return int(array.data.ptr), int(array.size), code, \
            int(self.cupy.cuda.get_current_stream().ptr)

    def all_reduce(self, array):
        ptr, count, code, stream = self._args("all_reduce_", array)
        self.comm.allReduce(ptr, ptr, count, code, self.nccl.NCCL_SUM, stream)

    def bcast(self, array, root):
        ptr, count, code, stream = self._args("broadcast_", array)
        self.comm.bcast(ptr, count, code, root, stream)


class ProcessGroup:
    """The ``size`` processes of a run and this one's ``rank`` (0 .. size-1), on ``device``.

    ``comm`` is the mpi4py communicator; on "cuda" an NCCL communicator carries the arrays.
    ``local_rank`` is the rank among the processes of this host (which picks its GPU). ``mpi``
    is mpi4py's MPI module, kept for the collectives (``init`` passes it; imported once, on
    first use, when not given).
    """

    def __init__(self, comm, device, local_rank=0, nccl=None, mpi=None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.device = device
        self.local_rank = local_rank
        self._nccl = nccl
        self._MPI = mpi         # mpi4py's MPI module (``init`` passes it), kept for collectives

    def _mpi(self):
        """MPI (IN_PLACE, SUM) without an import per collective: imported at most once."""
        if self._MPI is None:
            self._MPI = _mpi()
        return self._MPI

    def _contiguous(self, where, array):
        if not getattr(array, "flags", None) or not array.flags.c_contiguous:
            raise ValueError(f"ProcessGroup.{where}: expected a C-contiguous array, got "
                             f"{type(array).__name__} of shape {getattr(array, 'shape', None)}")
        xp = get_array_module(array)
        if (xp is not np) != (self.device == "cuda"):
            raise ValueError(f"ProcessGroup.{where}: the group is on {self.device}, the array on "
                             f"{'cuda' if xp is not np else 'cpu'}")
        return xp

    def all_reduce_(self, array):
        """Replace ``array`` by its sum over the processes, in place, the same bits on every
        process: ``MPI.Allreduce`` (NumPy) or NCCL's allReduce on the current stream (CuPy).
        Returns it."""
        xp = self._contiguous("all_reduce_", array)
        if (self.size == 1 and self._nccl is None) or array.size == 0:
            return array
        if xp is np:
            MPI = self._MPI or self._mpi()
            self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        else:
            self._nccl.all_reduce(array)
        return array

    def broadcast_(self, array, root=0):
        """Overwrite ``array`` with process ``root``'s, in place. Returns it."""
        xp = self._contiguous("broadcast_", array)
        if (self.size == 1 and self._nccl is None) or array.size == 0:
            return array
        if xp is np:
            self.comm.Bcast(array, root=root)
        else:
            self._nccl.bcast(array, root)
        return array

    def sum(self, values):
        """The sums over the processes of a list of host numbers, as Python floats (float64)."""
        buf = np.array(values, dtype=np.float64)
        if self.size > 1:
            MPI = self._MPI or self._mpi()
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf.tolist()

    def gather_object(self, obj, root=0):
        """Every process's ``obj`` (pickled) in a list on ``root``; None elsewhere."""
        return self.comm.gather(obj, root=root)

    def all_gather_object(self, obj):
        """Every process's ``obj`` in a list, on every process."""
        return self.comm.allgather(obj)

    def barrier(self):
        """Wait until every process has called it."""
        self.comm.Barrier()

    def abort(self, code=1):
        """End every process of the run with exit status ``code``."""
        self.comm.Abort(code)

    def __repr__(self):
        carrier = "NCCL" if self._nccl is not None else "MPI"
        return f"ProcessGroup(rank={self.rank}, size={self.size}, device={self.device}, {carrier})"


def _abort_on_exception(rank, size, comm):
    """sys.excepthook: the traceback, naming the rank, then Abort so no process is left waiting."""
    def hook(kind, value, tb):
        try:
            text = "".join(traceback.format_exception(kind, value, tb))
            sys.stdout.flush()
            sys.stderr.write(f"minicnn.distributed: rank {rank} of {size} failed; aborting every "
                             f"process:\n{text}")
            sys.stderr.flush()
        finally:
            comm.Abort(1)
    return hook


def _local_rank(comm, mpi):
    """The rank among the processes that share this host's memory."""
    if mpi is None:
        return 0
    local = comm.Split_type(mpi.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank()
    finally:
        local.Free()


def _pick_gpu(name, local_rank):
    """Make GPU ``local_rank % count`` CuPy's current device before anything touches a GPU (the
    availability probe of ``device("cuda")`` would otherwise open every process on GPU 0)."""
    if name == "cpu":
        return
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return                          # device() below says why there is no GPU
    if count:
        cupy.cuda.Device(local_rank % count).use()


def init(device="cpu", mpi=True, abort_on_error=True):
    """Join the run that ``mpiexec`` started (or a run of one process without it) and return its
    ``ProcessGroup``, kept as the default group of ``minicnn.distributed``.

    ``device``: "cpu" (arrays summed through MPI), "cuda" (this process's GPU, chosen before any
    other GPU work, arrays summed through NCCL) or "auto". Call it first, before moving anything
    to a GPU. ``mpi=False`` makes a group of one process without mpi4py (checks of the NCCL path
    on one GPU). ``abort_on_error``: an uncaught exception prints its traceback with the rank and
    aborts every process (``MPI.COMM_WORLD.Abort(1)``). Calling it again returns the same group
    (a different device raises ValueError). Without mpi4py: ImportError naming
    ``pip install "minicnn[mpi]"``.
    """
    global _group
    if device not in ("cpu", "cuda", "auto") and not isinstance(device, Device):
        raise ValueError(f"init: device must be 'cpu', 'cuda', 'auto' or a Device, got {device!r}")
    name = device.type if isinstance(device, Device) else device
    if _group is not None:
        if name != "auto" and _group.device != name:
            raise ValueError(f"init: this process already joined the run on {_group.device}, "
                             f"not {name}")
        return _group
    if mpi:
        MPI = _mpi()
        comm = MPI.COMM_WORLD
    else:
        MPI, comm = None, _OneProcess()
    local_rank = _local_rank(comm, MPI)
    _pick_gpu(name, local_rank)
    dev = _device(name)
    nccl = _NcclCalls(comm.Get_size(), comm.Get_rank(), comm) if dev == "cuda" else None
    group = ProcessGroup(comm, dev, local_rank, nccl, MPI)
    if abort_on_error and group.size > 1:      # alone, an exception ends the process anyway
        sys.excepthook = _abort_on_exception(group.rank, group.size, comm)
    _group = group
    return group


def is_initialized():
    """Whether ``init()`` has run in this process."""
    return _group is not None


def get_group():
    """The group of ``init()``; RuntimeError when it has not run."""
    if _group is None:
        raise RuntimeError("minicnn.distributed: no process group; call "
                           "minicnn.distributed.init() first (on a GPU, before moving the model "
                           "there: it picks this process's GPU)")
    return _group
