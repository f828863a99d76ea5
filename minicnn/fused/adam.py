"""Adam and AdamW over every parameter at once: the fast path beside ``minicnn.optim.Adam``.

``FusedAdam`` and ``FusedAdamW`` compute the update of ``optim.Adam`` and ``optim.AdamW`` bit for
bit (the kernel repeats the reference's operations in its order, each rounded on its own), but on
a GPU in one kernel launch for every parameter: ``adam_multi_tensor`` in ``kernels/fused.cu``.
The constants of a step (``AdamConstants``) are written by ``prepare_step``, on the host, into a
small array on the device that the kernel reads, so a CUDA graph of ``apply_step`` recorded once
follows the step count and a scheduler's learning rate: they are ``capturable``, which
``fit(cuda_graph=True)`` needs. On the CPU they run the plain update. Their ``state_dict`` is the
plain optimizer's, its type included, so a checkpoint moves between ``Adam`` and ``FusedAdam``.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from .. import cuda
from ..backend import get_array_module
from ..errors import ShapeError
from ..optim import Adam, AdamW


class AdamConstants(NamedTuple):
    """The constants of one Adam step, in the order of the hyper array that ``adam_multi_tensor``
    reads: ``hyper[0]`` is ``one_minus_beta1``, and so on (kernels/fused.cu names them alike)."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float     # L2 decay added to the gradient (Adam); 0 for AdamW
    step_size: float        # lr / (1 - beta1**t)
    bias2_sqrt: float       # sqrt(1 - beta2**t)
    decay: float            # 1 - lr*weight_decay (AdamW); 1 for Adam

    @classmethod
    def at_step(cls, lr, betas, eps, weight_decay, step, decoupled):
        """The constants of step ``step`` (1 on the first update), each computed in double as
        ``optim.Adam.apply_step`` computes it. ``decoupled``: AdamW."""
        if not (isinstance(step, numbers.Integral) and step >= 1):
            raise ValueError(f"AdamConstants.at_step: step must be an integer >= 1, got {step!r}")
        beta1, beta2 = betas
        return cls(one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
                   weight_decay=0.0 if decoupled else weight_decay,
                   step_size=lr / (1 - beta1**step), bias2_sqrt=math.sqrt(1 - beta2**step),
                   decay=1 - lr * weight_decay if decoupled else 1.0)


def adam_hyper(constants, xp, dtype, out=None):
    """``constants`` as the hyper array (8,) of ``adam_multi_tensor``, each rounded once to
    ``dtype``: exactly the constants the reference's array arithmetic uses (a float32 array times
    1 - 0.9 is a product with float32(0.1), not with 1 - float32(0.9)). Made with ``xp``, or
    written into ``out`` in place (it keeps its address, which a recorded CUDA graph reads).
    """
    host = np.array(constants, dtype=dtype)
    if out is None:
        return xp.asarray(host)
    if getattr(out, "shape", None) != host.shape or out.dtype != host.dtype:
        raise ValueError(f"adam_hyper: out must be an array of shape {host.shape} and dtype "
                         f"{host.dtype}, got {getattr(out, 'shape', type(out).__name__)} "
                         f"{getattr(out, 'dtype', '')}")
    if type(out) is np.ndarray:       # noqa: E721 -- a subclass may stand in for CuPy's
        out[...] = host
    else:    # CuPy: an asynchronous copy into the same memory; a plain set() would wait for the GPU
        out.set(host, stream=get_array_module(out).cuda.get_current_stream())
    return out


def pointer(a):
    """The address of array ``a``'s first element: device memory for CuPy, host for NumPy."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


class TensorTable:
    """The pointer table of a multi-tensor launch: for tensor j, the addresses of
    ``lists[0][j], lists[1][j], ...`` (uint64, on the arrays' module), the prefix sums of the
    tensors' sizes (offsets, int64, tensors+1) and their total.

    Made once and passed to every step, it spares the host-to-device copy of the table (which a
    CUDA graph could not capture). It keeps the arrays it points into alive, and ``matches``
    says whether it was made for these very arrays: a table of replaced arrays would point
    into freed memory.
    """

    def __init__(self, *lists):
        xp = get_array_module(lists[0][0])
        self.arrays = [list(arrays) for arrays in lists]
        sizes = [a.size for a in lists[0]]
        self.total = int(sum(sizes))
        self.pointers = xp.asarray(np.array([pointer(arrays[j]) for j in range(len(sizes))
                                             for arrays in lists], dtype=np.uint64))
        self.offsets = xp.asarray(np.cumsum([0] + sizes, dtype=np.int64))

    def matches(self, *lists):
        return len(lists) == len(self.arrays) and all(
            len(new) == len(old) and all(a is b for a, b in zip(new, old))
            for new, old in zip(lists, self.arrays))


def adam_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, hyper, table=None, launch=None):
    """One Adam (or AdamW) step of every tensor, in place, by one launch of kernels/fused.cu
    (one thread per element of all the tensors together): ``optim.Adam.apply_step``'s update.

    params, grads, exp_avgs, exp_avg_sqs: lists of C-contiguous device arrays, the four of each
    index of one shape, all of the dtype of ``hyper``; hyper (8,) from ``adam_hyper``. ``table``:
    the ``TensorTable(params, grads, exp_avgs, exp_avg_sqs)`` to reuse (made afresh when None).
    ``launch`` is ``minicnn.cuda.launch`` by default, the emulator's in the tests.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    _check_adam(*lists, hyper)
    if table is None:
        table = TensorTable(*lists)
    elif not table.matches(*lists):
        raise ValueError("adam_multi_tensor: table was made for other arrays; make a new "
                         "TensorTable(params, grads, exp_avgs, exp_avg_sqs) after replacing any")
    if table.total:
        (launch or cuda.launch)("fused.cu", "adam_multi_tensor", table.total, table.pointers,
                                table.offsets, len(params), hyper, table.total)


def _check_adam(params, grads, exp_avgs, exp_avg_sqs, hyper):
    name = "adam_multi_tensor"
    if getattr(hyper, "shape", None) != (8,) or hyper.dtype.kind != "f":
        raise ValueError(f"{name}: expected hyper, a floating-point array of shape (8,) from "
                         f"adam_hyper, got {getattr(hyper, 'shape', type(hyper).__name__)} "
                         f"{getattr(hyper, 'dtype', '')}")
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    counts = {key: len(value) for key, value in lists.items()}
    if len(set(counts.values())) != 1 or not params:
        raise ValueError(f"{name}: expected four lists of one length >= 1, got lengths {counts}")
    for j, p in enumerate(params):
        for key, arrays in lists.items():
            a = arrays[j]
            where = f"{name}: {key}[{j}]"
            if type(a) is not type(hyper):       # noqa: E721 -- one kind of array, one device
                raise TypeError(f"{where} is a {type(a).__module__}.{type(a).__name__}, but "
                                f"hyper is a {type(hyper).__module__}.{type(hyper).__name__}; "
                                "all must be arrays on one device")
            if a.dtype != hyper.dtype:
                raise TypeError(f"{where} has dtype {a.dtype}, expected that of hyper, "
                                f"{hyper.dtype}")
            if a.shape != p.shape:
                raise ShapeError(f"{where} has shape {tuple(a.shape)}, expected that of "
                                 f"params[{j}], {tuple(p.shape)}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{where} must be C-contiguous, got strides {a.strides} for "
                                 f"shape {tuple(a.shape)}")


class FusedAdam(Adam):
    """``optim.Adam`` (same arguments, same state) whose update is one ``adam_multi_tensor``
    launch for every parameter on a GPU, reading the step's constants from device memory, which
    ``prepare_step`` rewrites; on the CPU, ``Adam``'s own update. ``capturable``."""

    capturable = True
    state_type = "Adam"
    _hyper = _table = None      # the device array of AdamConstants; the kernel's TensorTable

    def prepare_step(self):
        """Count the step and, for parameters on a GPU, write its constants into the array the
        kernel reads (in place: a recorded graph keeps reading the same memory)."""
        super().prepare_step()
        data = self.params[0].data
        xp = get_array_module(data)
        if xp is np:
            return
        constants = AdamConstants.at_step(self.lr, self.betas, self.eps, self.weight_decay,
                                          self.step_count, self._decoupled)
        hyper = self._hyper
        reusable = hyper is not None and get_array_module(hyper) is xp and hyper.dtype == data.dtype
        self._hyper = adam_hyper(constants, xp, data.dtype, out=hyper if reusable else None)

    def apply_step(self):
        """The update of every parameter with ``requires_grad``: on a GPU one kernel launch (the
        table of addresses made once and kept while the arrays stay), on the CPU ``Adam``'s."""
        if get_array_module(self.params[0].data) is np:
            return super().apply_step()
        trainable = list(self._trainable())
        if not trainable:
            return
        lists = ([p.data for _, p in trainable], [p.grad for _, p in trainable],
                 [self._zeros(i, "exp_avg") for i, _ in trainable],
                 [self._zeros(i, "exp_avg_sq") for i, _ in trainable])
        if self._table is None or not self._table.matches(*lists):
            self._table = TensorTable(*lists)
        adam_multi_tensor(*lists, self._hyper, self._table)


class FusedAdamW(FusedAdam, AdamW):
    """``optim.AdamW`` (same arguments, same state) by ``FusedAdam``'s kernel. ``capturable``."""

    state_type = "AdamW"
