"""Speed of each matrix product of a training step, by cuBLAS and by minicnn's two GEMM kernels.

    PYTHONPATH=. python benchmarks/gemm.py                  # batch 128, float32, on the GPU
    PYTHONPATH=. python benchmarks/gemm.py --batch 256 --samples 30

The products are those of one training step of the fused example network (``minicnn.fuse``
of ``mnist_cnn``, its loss and ``FusedAdam``) at ``--batch``: the step is run once on the GPU
with cuBLAS while ``ops.matmul`` records the shape and layout of each product it is given (a
transposed view such as ``w.T`` stays one). Each product is then timed, on new random operands
of that shape and layout, three ways: ``cupy.matmul`` (cuBLAS), ``ops.matmul_kernel``
(kernels/gemm.cu, the readable kernel) and ``fused.gemm.matmul_tiled`` (kernels/gemm_tiled.cu,
the kernel of the CUDA-graph step).

Timing: CUDA events around ``--inner`` calls, after a kernel that keeps the GPU busy for a few
milliseconds while the host queues them, so that the events measure the GPU's work and not
Python's launches (which a CUDA graph does not repeat). Each figure is the median over
``--samples`` samples, after warm-up calls. The table gives milliseconds per call, the tiled
kernel's GFLOP/s (2*M*N*K per product), and the time ratios tiled/cuBLAS and reference/tiled;
the last column is the tiled kernel's largest difference from cuBLAS relative to the largest
element. Without a usable GPU the script says why and exits with status 0.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from minicnn import ops  # noqa: E402
from minicnn.fused.gemm import TILING, matmul_tiled  # noqa: E402

SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
"""


def _layout(x):
    """"C" for a C-contiguous operand, "T" for a transposed view of one, else "strided"."""
    if x.flags.c_contiguous:
        return "C"
    return "T" if x.swapaxes(-1, -2).flags.c_contiguous else "strided"


def step_products(batch, device="cuda", dtype=np.float32):
    """[(a's shape, b's shape, a's layout, b's layout)] of every ``ops.matmul`` of one training
    step of the fused example network at ``batch`` on ``device``, in the order they run."""
    from minicnn.fused import CrossEntropyLoss, FusedAdam
    from minicnn.models import mnist_cnn
    seen = []
    real = ops.matmul

    def recording(a, b):
        seen.append((tuple(a.shape), tuple(b.shape), _layout(a), _layout(b)))
        return real(a, b)
    before = minicnn.get_default_dtype()
    minicnn.set_default_dtype(dtype)
    ops.matmul = recording          # the layers look it up on the module at each call
    try:
        minicnn.seed(0)
        model = minicnn.fuse(mnist_cnn()).to(device)
        loss_fn, opt = CrossEntropyLoss(), FusedAdam(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        x = minicnn.to_device(rng.standard_normal((batch, 1, 28, 28)).astype(dtype), device)
        y = minicnn.to_device(rng.integers(0, 10, batch), device)
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    finally:
        ops.matmul = real
        minicnn.set_default_dtype(before)
    return seen


def operand(xp, rng, shape, layout, dtype):
    """Random values of ``shape`` laid out as ``layout`` ("T": a transposed view)."""
    if layout == "T":
        stored = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])).astype(dtype)
        return xp.asarray(stored).swapaxes(-1, -2)
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def gpu_ms(cupy, fn, samples, inner, spin):
    """Median milliseconds of the GPU work of one ``fn()``: CUDA events around ``inner`` calls
    queued while ``spin`` keeps the GPU busy."""
    for _ in range(3):
        fn()                                # warm-up: compilation, the memory pool
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(samples):
        spin()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / inner)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="batch of the training step")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--samples", type=int, default=15, help="timed samples per figure")
    parser.add_argument("--inner", type=int, default=10, help="calls per sample")
    args = parser.parse_args(argv)
    reason = minicnn.backend.cuda_unavailable_reason()
    if reason is not None:
        print(f"benchmarks/gemm.py needs a usable CUDA GPU: {reason}")
        return 0
    import cupy
    dtype = np.dtype(args.dtype)
    shapes = step_products(args.batch, "cuda", dtype)
    spin_kernel = cupy.RawKernel(SPIN, "spin")

    def spin():         # 5e6 cycles, 2.5 ms at 2 GHz: longer than Python takes to queue the calls
        spin_kernel((1,), (1,), (np.int64(5_000_000),))
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"{name}, CuPy {cupy.__version__}, {dtype}, products of one training step of fused "
          f"mnist_cnn at batch {args.batch}; median of {args.samples} samples of {args.inner} "
          f"calls; tiled kernel {TILING.bm}x{TILING.bn}x{TILING.bk}, {TILING.tm}x{TILING.tn} "
          "per thread")
    head = (f"{'product (M,K)@(K,N)':<34} {'split':>5} {'cuBLAS ms':>10} {'ref ms':>9} "
            f"{'tiled ms':>9} {'GFLOP/s':>8} {'tiled/cuBLAS':>12} {'ref/tiled':>9} {'max diff':>9}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(1)
    totals = np.zeros(3)
    for a_shape, b_shape, la, lb in shapes:
        a, b = operand(cupy, rng, a_shape, la, dtype), operand(cupy, rng, b_shape, lb, dtype)
        M, K, N = a_shape[-2], a_shape[-1], b_shape[-1]
        batch = int(np.prod(a_shape[:-2] or b_shape[:-2]))
        splits, _ = TILING.split(batch, M, N, K)
        ms = [gpu_ms(cupy, lambda f=f: f(a, b), args.samples, args.inner, spin)
              for f in (cupy.matmul, ops.matmul_kernel, matmul_tiled)]
        totals += ms
        want = cupy.matmul(a, b)
        diff = float(cupy.abs(matmul_tiled(a, b) - want).max() / cupy.abs(want).max())
        label = f"{a_shape}{'T' if la == 'T' else ''} @ {b_shape}{'T' if lb == 'T' else ''}"
        gflops = 2 * batch * M * N * K / (ms[2] * 1e-3) / 1e9
        print(f"{label:<34} {splits:>5} {ms[0]:>10.4f} {ms[1]:>9.4f} {ms[2]:>9.4f} "
              f"{gflops:>8.0f} {ms[2] / ms[0]:>12.2f} {ms[1] / ms[2]:>9.1f} {diff:>9.1e}")
    print("-" * len(head))
    print(f"{'all ' + str(len(shapes)) + ' products':<34} {'':>5} {totals[0]:>10.4f} "
          f"{totals[1]:>9.4f} {totals[2]:>9.4f} {'':>8} {totals[2] / totals[0]:>12.2f} "
          f"{totals[1] / totals[2]:>9.1f}")
    print("(T: a transposed view, read in place)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
