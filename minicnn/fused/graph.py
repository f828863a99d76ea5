"""A training step recorded once as a CUDA graph and replayed: ``fit(..., cuda_graph=True)``.

At batch 128 a step of the example network is about fifty small kernels, and Python needs
several microseconds to launch each one: the GPU would wait for the host. A CUDA graph is the
whole sequence recorded by the driver and started again with one launch. Recording runs the
step's Python code once with the kernels captured instead of run, so whatever the step does on
the host happens once only. That sets three rules, and this module keeps them:

- Fixed addresses. A graph reads and writes the memory it was recorded with. Each batch is
  copied into the same static input arrays before a replay, and every array the recorded step
  allocates is kept for as long as the graph (``_KeepAll``), so the memory pool never lends that
  memory to anything else. Parameters, gradients, optimizer state and the device-side loss and
  accuracy sums are all updated in place.
- Nothing read back inside the step. A step that waits for a device value cannot be recorded:
  the cross-entropy's target check is deferred (``CrossEntropyLoss.check``) and the running loss
  and accuracy are summed on the device (``train._Meter``).
- Values that change from step to step are in device memory. The optimizer's step count and
  learning rate go into a small device array that ``optimizer.prepare_step()`` rewrites before
  each replay; its update kernel reads them from there (``FusedAdam``/``FusedAdamW``).

- No cuBLAS. CuPy refuses to call cuBLAS while a stream is capturing, so every matrix product
  of the step, from the first warm-up on, goes through a GEMM kernel of minicnn, chosen by
  ``ops.products_by_kernel``: the fast tier's ``kernels/gemm_tiled.cu`` (``fused.gemm``), or
  the one an enclosing ``products_by_kernel`` block names (an eager run compared bit for bit
  with the graph names the same).

Before recording, at least one eager step runs on the capture stream so that kernels are
compiled and loaded and the first-use state (optimizer buffers, the optimizer's pointer table,
the loss and accuracy sums) exists: made inside the recording, every replay would make it
afresh. Batches of another shape (the last one of an epoch) run eagerly, so the graph and eager
paths train on exactly the same steps.
"""
from .. import ops
from ..backend import get_array_module
from .gemm import matmul_tiled


class GraphStep:
    """``step(x, y)`` runs ``prepare()`` on the host, then ``body(x, y)`` on the device.

    ``body`` must run the whole step without reading anything back. The first ``warmup`` calls
    run it eagerly; the next one records it as a graph (``recorder``, by default a CUDA graph
    through CuPy) and every later call with batches of the same shape and dtype replays it.
    Its products run on ``matmul`` (``ops.products_by_kernel``); None: the function of an
    enclosing ``products_by_kernel`` block, else ``fused.gemm.matmul_tiled``.
    """

    def __init__(self, body, prepare, warmup=3, recorder=None, matmul=None):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"GraphStep: warmup must be an int >= 1 (the first step makes the "
                             f"state a recording must not make), got {warmup!r}")
        self.body, self.prepare, self.warmup, self.matmul = body, prepare, warmup, matmul
        self.recorder = recorder if recorder is not None else CudaRecorder()
        self.replays = 0            # graph launches, the first right after recording included
        self._calls = 0
        self._graph = self._x = self._y = None

    def __call__(self, x, y):
        self.prepare()
        with ops.products_by_kernel(self._products()):
            self._step(x, y)

    def _products(self):
        """The product function for ``products_by_kernel``: None keeps an enclosing block's."""
        if self.matmul is not None or ops._kernel_products:
            return self.matmul
        return matmul_tiled

    def _step(self, x, y):
        if self._x is not None and (x.shape, x.dtype, y.shape) != (self._x.shape, self._x.dtype,
                                                                  self._y.shape):
            self.body(x, y)                             # another shape: eager, as without a graph
            return
        if self._x is None:
            xp = get_array_module(x)
            self._x, self._y = xp.empty_like(x), xp.empty_like(y)
        self._x[...] = x
        self._y[...] = y
        if self._graph is None and self._calls < self.warmup:
            self._calls += 1
            self.recorder.warm(lambda: self.body(self._x, self._y))
            return
        if self._graph is None:
            self._graph = self.recorder.record(lambda: self.body(self._x, self._y))
        self._graph.launch()
        self.replays += 1


class CudaRecorder:
    """Records with CuPy's stream capture on a stream of its own; the graph replays on the
    current stream, so it runs in order with the batch copies before it."""

    def __init__(self):
        import cupy
        self._cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.kept = None

    def _on_stream(self, fn, allocator=None):
        cupy = self._cupy
        here = cupy.cuda.get_current_stream()
        self.stream.wait_event(here.record())       # the static inputs are written on ``here``
        with self.stream:
            if allocator is None:
                result = fn()
            else:
                with cupy.cuda.using_allocator(allocator):
                    result = fn()
        here.wait_event(self.stream.record())
        return result

    def warm(self, fn):
        self._on_stream(fn)

    def record(self, fn):
        self.kept = _KeepAll(self._cupy.get_default_memory_pool())

        def capture():
            self.stream.begin_capture()
            try:
                fn()
            finally:
                graph = self.stream.end_capture()
            return graph
        return self._on_stream(capture, allocator=self.kept.malloc)   # launch() replays it


class _KeepAll:
    """An allocator that takes memory from the pool and never gives it back while it lives: the
    arrays a recorded step frees would otherwise be lent to other work, and each replay would
    write over it."""

    def __init__(self, pool):
        self._pool, self.blocks = pool, []

    def malloc(self, size):
        block = self._pool.malloc(size)
        self.blocks.append(block)
        return block
