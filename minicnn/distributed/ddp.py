"""``DistributedDataParallel``: one model replica per process, gradients summed after backward.

Every process starts from rank 0's parameters (broadcast when the wrapper is made), runs forward
and backward on its own batch, and then one all-reduce per parameter dtype makes every gradient
the mean over all the processes' samples, so that the optimizer takes the same step everywhere:
the step one process would take on the union of the batches.
"""
import hashlib

from ..backend import get_array_module, to_numpy
from ..module import Module, Parameter
from .comm import get_group


class DistributedDataParallel(Module):
    """``module`` trained by every process of ``group`` (the group of ``init()`` by default), with
    PyTorch's ``DistributedDataParallel`` semantics on minicnn's manual backward.

    - Made: rank 0's parameters and buffers are broadcast to every process, and each
      ``Parameter.grad`` becomes a view into one flat buffer per dtype (plus a slot for the
      sample count), which the all-reduce sums in place: no copy in or out.
    - ``forward(x)`` is the module's; in training mode it notes the batch size B_r = len(x).
    - ``eval()`` (``train(False)``) from training mode, with ``broadcast_buffers`` (default),
      first overwrites the buffers (BatchNorm's running statistics) with rank 0's, so that every
      process evaluates the same model. It is then a collective: call it on every process (as
      ``fit`` and ``evaluate`` do); for work on one process alone use the bare ``.module``.
    - ``backward(dy)`` runs the module's backward, then ``reduce_gradients()``: each process
      multiplies its gradient by B_r, the buffers are summed over the processes together with
      the B_r, and divided by their sum. With a loss that is a mean over the batch (minicnn's
      ``CrossEntropyLoss``) each gradient becomes the mean over the union of the batches, also
      when the processes' batches differ in size. Equal sizes give DDP's plain average.
    - ``parameters()``, ``state_dict()``, ``load_state_dict()``, ``train()``/``eval()`` and
      ``minicnn.save``/``load`` see the module itself: names have no prefix, and a checkpoint
      loads into the bare module.

    Wrap last: after ``minicnn.fuse`` and after moving the model to the group's device. Each
    backward all-reduces, so a step must call backward once on every process (as ``fit`` does).
    BatchNorm normalises by each process's own batch statistics, as DDP without SyncBatchNorm;
    each process updates its running averages with its own batches (a training forward reads
    none), and switching to evaluation overwrites them with rank 0's, the ones saved. ``fit``
    given a wrapped model prints and writes checkpoints on rank 0 only and all-reduces its
    metrics.
    """

    def __init__(self, module, group=None, broadcast=True, broadcast_buffers=True):
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel: expected a minicnn Module, "
                            f"got {type(module).__name__}")
        if isinstance(module, DistributedDataParallel):
            raise TypeError("DistributedDataParallel: the module is already wrapped")
        group = get_group() if group is None else group
        params = module.parameters()
        if not params:
            raise ValueError("DistributedDataParallel: the module has no parameters to train")
        for name, p in module.named_parameters():
            if p.device != group.device:
                raise ValueError(f"DistributedDataParallel: parameter {name!r} is on {p.device}, "
                                 f"the process group on {group.device}; move the model with "
                                 f".to({str(group.device)!r}) before wrapping it")
        self.module = module
        self.process_group = group
        self.broadcast_buffers = bool(broadcast_buffers)
        self._count = None          # the batch size of the last training-mode forward
        self._first = None          # the first parameter and its bound gradient view: the
        self._first_view = None     # O(1) check that the flat buffers are still the gradients
        self._buffers_flat = []     # one flat gradient buffer (+1 count slot) per dtype
        if broadcast:
            self.broadcast_parameters()
        self._bind()

    # --- the module, seen through the wrapper ----------------------------------------------------

    @property
    def training(self):
        return self.module.training

    def named_children(self):
        return self.module.named_children()

    def named_modules(self, prefix=""):
        return self.module.named_modules(prefix)

    def named_parameters(self, prefix=""):
        return self.module.named_parameters(prefix)

    def named_buffers(self, prefix=""):
        return self.module.named_buffers(prefix)

    def _named_state(self, prefix=""):
        return self.module._named_state(prefix)

    def output_shape(self, in_shape):
        return self.module.output_shape(in_shape)

    def summary(self, input_shape):
        return self.module.summary(input_shape)

    def to(self, dev):
        """Only to the group's device (the process's GPU is fixed by ``init``); returns self."""
        if dev != self.process_group.device:
            raise ValueError(f"DistributedDataParallel.to: the process group is on "
                             f"{self.process_group.device}, not {dev}")
        self.module.to(dev)
        self._bind()            # Module.to gives each parameter a new gradient array
        return self

    def train(self, mode=True):
        """Set the module's training mode; returns self. Switching from training to evaluation
        with ``broadcast_buffers`` first overwrites every buffer with rank 0's (a collective:
        every process must make the same call), so that all processes evaluate one model."""
        if not mode and self.broadcast_buffers and self.module.training:
            for b in self.module.buffers():
                self.process_group.broadcast_(b, 0)
        self.module.train(mode)
        return self

    # --- training --------------------------------------------------------------------------------

    def forward(self, x):
        if self.module.training:
            self._count = int(x.shape[0])
        return self.module.forward(x)

    def backward(self, dy, input_grad=True):
        """The module's backward, then ``reduce_gradients()``; returns the module's dx."""
        dx = self.module.backward(dy, input_grad=input_grad)
        self.reduce_gradients()
        return dx

    def reduce_gradients(self, count=None):
        """Make every ``Parameter.grad`` the sample-weighted mean over the processes:
        sum_r B_r * grad_r / sum_r B_r, with B_r this process's ``count`` (default: the batch
        size of the last training forward). One all-reduce per dtype; the same bits on every
        process. On a GPU nothing is read back: the division reads the summed count on the device.
        """
        count = self._count if count is None else count
        if count is None:
            raise RuntimeError("DistributedDataParallel.reduce_gradients: no batch size; run a "
                               "training-mode forward first or pass count=")
        if self._first.grad is not self._first_view:     # replaced behind .to's back
            self._bind()
        for flat in self._buffers_flat:
            grads = flat[:-1]
            # exact when B_r is a power of two; the grads stay on the device either way
            grads *= count
            flat[-1] = count
            self.process_group.all_reduce_(flat)
            grads /= flat[-1]

    def broadcast_parameters(self, root=0):
        """Overwrite every parameter and buffer with process ``root``'s, in place."""
        for p in self.module.parameters():
            self.process_group.broadcast_(p.data, root)
        for b in self.module.buffers():
            self.process_group.broadcast_(b, root)

    def assert_in_sync(self):
        """Raise RuntimeError unless every process holds the same parameter and buffer bits
        (a hash of them, gathered; reads the arrays back to the host)."""
        digest = hashlib.sha256()
        for _, value in self.module._named_state():
            arr = to_numpy(value.data if isinstance(value, Parameter) else value)
            digest.update(arr.tobytes())
        hashes = self.process_group.all_gather_object(digest.hexdigest())
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            raise RuntimeError(f"DistributedDataParallel: the parameters of ranks {differ} differ "
                               f"from rank 0's")

    # --- the flat gradient buffers ---------------------------------------------------------------

    def _bind(self):
        """Put every gradient into a flat buffer of its dtype (values kept) and make
        ``Parameter.grad`` a view of its part. Redone by ``to`` (``Module.to`` makes new
        arrays), so an optimizer always sees the live views; ``reduce_gradients`` rebinds too when
        the first parameter's gradient is no longer its view (an O(1) check: the bare module was
        moved on its own)."""
        groups = {}
        for p in self.module.parameters():
            groups.setdefault(p.grad.dtype, []).append(p)
        self._buffers_flat = []
        for dtype, params in groups.items():
            xp = get_array_module(params[0].grad)
            flat = xp.zeros(sum(int(p.size) for p in params) + 1, dtype=dtype)
            offset = 0
            for p in params:
                view = flat[offset:offset + p.size].reshape(p.shape)
                view[...] = p.grad
                p.grad = view
                offset += p.size
            self._buffers_flat.append(flat)
        self._first = self.module.parameters()[0]
        self._first_view = self._first.grad

    def __repr__(self):
        g = self.process_group
        inner = repr(self.module).replace("\n", "\n  ")
        return f"DistributedDataParallel(rank {g.rank} of {g.size}, {g.device},\n  {inner}\n)"
