"""Train the example CNN on MNIST and report test accuracy per epoch.

    python examples/mnist.py --epochs 1            # CPU, full MNIST (downloaded once if needed)
    python examples/mnist.py --device auto --save mnist.npz
    python examples/mnist.py --device cuda --batch-size 128 --cuda-graph   # one launch per step
    python examples/mnist.py --epochs 2 --batch-size 128 --onecycle 5e-3   # 99.0% (seed 0)
    python examples/mnist.py --epochs 5 --checkpoint-dir ckpt --checkpoint-every 200 --resume
    mpiexec -n 2 python examples/mnist.py --distributed   # data-parallel (docs/distributed.md)
    python examples/mnist.py --export-onnx mnist.onnx   # then run it with onnxruntime, TensorRT

Network: conv(1->32, 3x3), ReLU, maxpool 2, conv(32->64, 3x3), ReLU, maxpool 2, fc(1600->128),
ReLU, fc(128->10); Adam(1e-3), batch 64. It trains the fused network (``minicnn.fuse``), which
computes what the plain layers compute, faster. With no MNIST on disk and no network, it says so and
trains on the small MNIST sample bundled with minicnn instead.
"""
import argparse
import os
import sys

# Read by OpenBLAS once, when NumPy loads it: idle threads sleep right after a product instead of
# spinning ~0.1 s on a core the next work needs (docs/design.md, "Process-wide settings").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
import minicnn  # noqa: E402
import minicnn.onnx  # noqa: E402  (imports onnx only when --export-onnx asks for it)
from minicnn.data import MNIST, DataLoader, DatasetUnavailable, mnist_sample  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402
from minicnn.train import add_checkpoint_arguments, checkpoint_options  # noqa: E402
import minicnn.distributed  # noqa: E402  (imports mpi4py only when --distributed asks for it)


def load_data(data_dir):
    """(train, test) datasets: full MNIST when it can be found or downloaded, else the sample."""
    try:
        return MNIST(data_dir, train=True), MNIST(data_dir, train=False)
    except DatasetUnavailable as e:
        bar = "!" * 78
        print(f"{bar}\nMNIST is not available: {e}\n\nTraining on the bundled sample instead "
              f"(5,000 training and 1,000 test images), so accuracy will be lower than on the "
              f"full set.\n{bar}", file=sys.stderr)
        return mnist_sample(train=True), mnist_sample(train=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train minicnn's example CNN on MNIST.")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--data-dir", default=None,
                    help="folder holding the MNIST IDX files (default: $MINICNN_DATA, then the user cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onecycle", type=float, default=None, metavar="MAX_LR",
                    help="OneCycleLR up to MAX_LR and down over all the steps, instead of a fixed --lr")
    ap.add_argument("--save", default=None, metavar="PATH",
                    help="write a checkpoint (.npz, with optimizer state) after every epoch")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--export-onnx", default=None, metavar="PATH",
                    help="after training, write the trained model to PATH as ONNX (minicnn.onnx; "
                         "pip install \"minicnn[onnx]\")")
    add_checkpoint_arguments(ap)       # --checkpoint-dir DIR --checkpoint-every N --resume
    ap.add_argument("--cuda-graph", action="store_true",
                    help="record the training step as a CUDA graph and replay it (GPU only)")
    ap.add_argument("--tf32", action="store_true",
                    help="let float32 products use TF32 tensor cores (GPU only; off by default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the dtype of the parameters and images")
    ap.add_argument("--distributed", action="store_true",
                    help="data-parallel over the processes of mpiexec (MPI; NCCL on GPUs); "
                         "--batch-size is then per process (pip install \"minicnn[mpi]\")")
    args = ap.parse_args(argv)
    resumable = checkpoint_options(ap, args)
    if args.export_onnx and minicnn.onnx.unavailable_reason():      # say so before training
        ap.error(f"--export-onnx: {minicnn.onnx.unavailable_reason()}")
    minicnn.tune_process()      # process-wide: glibc keeps freed memory for reuse (fit does it too)

    group = None
    if args.distributed:        # first: on a GPU it picks this process's device
        if args.cuda_graph:
            ap.error("--cuda-graph cannot record the all-reduce of --distributed")
        group = minicnn.distributed.init(args.device)
    dev = minicnn.device(args.device) if group is None else group.device
    leader = group is None or group.rank == 0       # the process that prints and writes
    if (args.cuda_graph or args.tf32) and dev != "cuda":
        ap.error(f"--cuda-graph and --tf32 need a GPU, but the device is {dev}")
    if args.tf32:
        try:
            minicnn.backend.allow_tf32(True)
        except minicnn.backend.DeviceError as e:       # a GPU older than Ampere
            ap.error(str(e))
    minicnn.seed(args.seed)
    minicnn.set_default_dtype(args.dtype)
    train_set, test_set = load_data(args.data_dir)
    if group is None:
        train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, device=dev)
        test = DataLoader(test_set, batch_size=1000, device=dev)
    else:       # each process takes its share of every batch, and of the test set
        shard = minicnn.distributed.DistributedSampler
        train = DataLoader(train_set, batch_size=args.batch_size, device=dev,
                           sampler=shard(train_set, seed=args.seed))
        test = DataLoader(test_set, batch_size=1000, device=dev,
                          sampler=shard(test_set, shuffle=False, even=False))
    # The fast path, asked for here: minicnn.fuse puts fused modules (convolution, ReLU and max
    # pool in one; linear and ReLU) in place of the plain layers, with the same parameters; the
    # fused loss and FusedAdam are one kernel each on a GPU. fit trains whatever it is given.
    model = minicnn.fuse(mnist_cnn()).to(dev)
    optimizer = minicnn.fused.FusedAdam(model.parameters(), lr=args.lr)
    loss_fn = minicnn.fused.CrossEntropyLoss()
    # rank 0's weights on every process; each backward then averages the gradients over them
    trained = model if group is None else minicnn.distributed.DistributedDataParallel(model)
    scheduler = None
    if args.onecycle is not None:
        scheduler = minicnn.OneCycleLR(optimizer, max_lr=args.onecycle,
                                       total_steps=args.epochs * len(train))
    if leader:
        print(f"device {dev}; {len(train_set):,} training and {len(test_set):,} test images; "
              f"{model.num_parameters():,} parameters; fused by minicnn.fuse into "
              f"{', '.join(type(m).__name__ for m in model)}"
              + ("" if group is None else f"; {group.size} process(es)"))

    def save(row):
        minicnn.save(model, args.save, optimizer=optimizer, scheduler=scheduler,
                     metadata={"epoch": row["epoch"], "test_accuracy": row["val_accuracy"]})

    history = minicnn.fit(trained, loss_fn, optimizer, train, epochs=args.epochs, val_loader=test,
                          scheduler=scheduler, scheduler_interval="batch",
                          progress=not args.no_progress,
                          on_epoch_end=save if args.save and leader else None,
                          cuda_graph=args.cuda_graph, **resumable)
    if args.export_onnx and leader:     # the model as trained (fused); the file has a dynamic batch
        # float32 whatever --dtype: onnxruntime's CPU provider has no float64 convolution
        minicnn.onnx.export(model, test_set.images[:1], args.export_onnx, dtype="float32")
        print(f"ONNX model written to {args.export_onnx}")
    return history


if __name__ == "__main__":
    main()
