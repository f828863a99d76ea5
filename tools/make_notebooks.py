"""Write the notebooks of notebooks/ from the cells below and the docs pages they share code with.

    python tools/make_notebooks.py            # rewrites notebooks/*.ipynb (needs nbformat)
    python tools/make_notebooks.py --check    # exit 1 if a notebook is not what would be written

The docs are the one source of the code a notebook shares with them: a cell made by
``docs_block(page, marker)`` is the ```python block of docs/<page> that contains ``marker``,
copied when the notebook is written, and ``docs_page(page, after)`` turns the rest of a page,
after its block number ``after``, into cells (prose and code). Those cells say where they come
from in their metadata (``"minicnn": {"from": "docs/<page>"}``). tests/test_notebooks.py checks
that the committed notebooks are what this script writes now, so a changed docs block that was
not carried into the notebooks fails the tests, and nbmake runs the notebooks themselves.

Notebooks are written without outputs. Their first code cell installs minicnn from the
repository on Colab and is tagged ``skip-execution`` (nbmake and nbclient skip it: the tests run
the notebooks with minicnn already installed); their second runs ``python -m minicnn doctor``
and, without a GPU, says how to ask Colab for one.
"""
import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minicnn.io import write_atomic  # noqa: E402

DOCS = ROOT / "docs"
OUT = ROOT / "notebooks"

# The GitHub repository the notebooks install minicnn from and open in Colab from: "OWNER/NAME".
# OWNER stands in for the account the repository is published under until it is set here; run
# the script again after changing it.
REPOSITORY = "OWNER/minicnn"
COLAB = "https://colab.research.google.com/github/{repository}/blob/main/notebooks/{name}"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
SOURCE = "https://github.com/{repository}/blob/main/docs/{page}"

# an optional marker comment, then a fenced python block (as tests/test_docs.py reads pages)
_BLOCK = re.compile(r"(?:^<!--\s*([\w-]+)\s*:\s*.*?\s*-->[ \t]*\n)?"
                    r"^```python[ \t]*\n(.*?)^```[ \t]*\n?", re.M | re.S)


def _blocks(page):
    """(text, the matches of its python blocks) of docs/<page>: the marker in group 1, the code
    in group 2."""
    text = (DOCS / page).read_text()
    return text, list(_BLOCK.finditer(text))


def _cell_code(page, m):
    """The code of block ``m`` for a notebook cell, refusing a ``no-run`` block: it needs a GPU
    or the network, and nbmake runs the notebooks on a CPU."""
    if m.group(1) == "no-run":
        raise SystemExit(f"make_notebooks: a no-run block of docs/{page} cannot be a notebook "
                         f"cell (nbmake runs them on a CPU):\n{m.group(2)}")
    return m.group(2)


# --- cells ---------------------------------------------------------------------------------------

def _nbformat():
    try:
        import nbformat
    except ImportError:
        sys.exit('make_notebooks: needs nbformat (pip install -e ".[test]", which brings nbmake)')
    return nbformat


def md(text):
    return _nbformat().v4.new_markdown_cell(text.strip("\n"))


def code(text, tags=(), source=None):
    cell = _nbformat().v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    if source is not None:
        cell.metadata["minicnn"] = {"from": f"docs/{source}"}
    return cell


def docs_block(page, marker):
    """A code cell holding the one ```python block of docs/<page> that contains ``marker``."""
    found = [m for m in _blocks(page)[1] if marker in m.group(2)]
    if len(found) != 1:
        raise SystemExit(f"make_notebooks: expected one python block of docs/{page} containing "
                         f"{marker!r}, found {len(found)}; update the marker in "
                         f"tools/make_notebooks.py")
    return code(_cell_code(page, found[0]), source=page)


def _notebook_markdown(text, page):
    """Prose of a docs page as notebook markdown: no marker comments, no pictures of docs/img
    (the cell above draws them), links to other pages pointing at the repository's copy."""
    text = re.sub(r"^<!--.*?-->[ \t]*\n", "", text, flags=re.M)
    text = re.sub(r"^!\[[^\]]*\]\(img/[^)]*\)[ \t]*\n?", "", text, flags=re.M)
    folder = Path(page).parent.as_posix()

    def link(m):
        target = m.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            return m.group(0)
        path = os.path.normpath(os.path.join(folder, target)).replace(os.sep, "/")
        return f"[{m.group(1)}]({SOURCE.format(repository=REPOSITORY, page=path)})"

    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)]+)\)", link, text)


def docs_page(page, after):
    """Cells for docs/<page> from after its python block number ``after`` to the end: each
    stretch of prose a markdown cell, each python block a code cell."""
    text, blocks = _blocks(page)
    if len(blocks) <= after:
        raise SystemExit(f"make_notebooks: docs/{page} has {len(blocks)} python blocks, "
                         f"none after number {after}")
    cells, position = [], blocks[after].end()
    for m in blocks[after + 1:]:
        prose = _notebook_markdown(text[position:m.start()], page).strip()
        if prose:
            cells.append(md(prose))
        cells.append(code(_cell_code(page, m), source=page))
        position = m.end()
    prose = _notebook_markdown(text[position:], page).strip()
    if prose:
        cells.append(md(prose))
    return cells


# --- what every notebook starts with -------------------------------------------------------------

def header(name, title, intro):
    """Title and Colab badge, the install cell (skipped in the tests), the doctor cell."""
    url = COLAB.format(repository=REPOSITORY, name=name)
    return [
        md(f"# {title}\n\n[![Open In Colab]({BADGE})]({url})\n\n{intro.strip()}"),
        code(f'''
# On Colab, or anywhere minicnn is not installed yet: install it from its repository. NumPy and,
# on a Colab GPU, CuPy are there already. (The test suite skips this cell.)
REPOSITORY = "https://github.com/{REPOSITORY}"
!pip install -q "minicnn[plot] @ git+{{REPOSITORY}}.git"
''', tags=["skip-execution"]),
        code('''
# What minicnn finds here: Python, NumPy, CuPy, the GPU, and a compile of every CUDA kernel.
import sys

from minicnn.backend import cuda_unavailable_reason

!{sys.executable} -m minicnn doctor
if cuda_unavailable_reason() is not None:
    print("\\nNo usable GPU here, so minicnn runs on the CPU. For a GPU on Colab:")
    print("Runtime > Change runtime type > a GPU (T4 GPU) > Save, then run the notebook again.")
'''),
    ]


SETTINGS = '''
import os
import tempfile

import numpy as np
import minicnn

%matplotlib inline
# Under pytest (nbmake runs the notebooks in the test suite) or with MINICNN_NOTEBOOK_SMALL set:
# the bundled MNIST sample and short runs, in a scratch folder. Elsewhere (Colab): all of MNIST.
SMALL = "PYTEST_CURRENT_TEST" in os.environ or "MINICNN_NOTEBOOK_SMALL" in os.environ
if SMALL:
    scratch = tempfile.TemporaryDirectory()
    os.chdir(scratch.name)
dev = minicnn.device("auto")         # the GPU when one is usable, else the CPU (it says why)
'''

DATA = '''
from minicnn.data import ArrayDataset, DataLoader, mnist_sample
from minicnn.models import mnist_cnn

minicnn.seed(0)                      # one generator: weights, shuffling, dropout
if SMALL:
    train_set = ArrayDataset(*mnist_sample(train=True)[:2000])
    test_set = mnist_sample(train=False)
else:
    try:                             # downloaded once (11 MB), checked against SHA-256
        train_set, test_set = minicnn.MNIST(train=True), minicnn.MNIST(train=False)
    except minicnn.DatasetUnavailable as e:
        print(f"MNIST could not be downloaded; the bundled sample stands in for it.\\n{e}")
        train_set, test_set = mnist_sample(train=True), mnist_sample(train=False)
print(train_set, test_set, sep="\\n")
'''


# --- the notebooks -------------------------------------------------------------------------------

def tutorial():
    name = "01_tutorial.ipynb"
    return name, header(name, "Train a digit classifier with minicnn", '''
minicnn is a small CNN framework written from scratch to be read: NumPy on the CPU, CuPy and
hand-written CUDA kernels on a GPU, every backward pass written out by hand. This notebook trains
its example network on MNIST, on the GPU when there is one and otherwise on the CPU; the
[tutorial](https://github.com/{repository}/blob/main/docs/tutorial.md) explains each step at
more length.
'''.format(repository=REPOSITORY)) + [
        md("## Settings and data"),
        code(SETTINGS + "EPOCHS = 1 if SMALL else 3\n"),
        code(DATA),
        md('''
## The model

`summary` runs every layer's shape check for an input shape, without computing anything.
'''),
        docs_block("tutorial.md", "print(model.summary((1, 1, 28, 28)))"),
        md('''
## Training

`model.to(dev)` moves the parameters; `DataLoader(..., device=dev)` moves the whole dataset
once, so every batch is cut out on the device. `fit` prints a progress bar and one line per
epoch: the training means over the epoch, then loss and accuracy on the test set.
'''),
        code('''
model.to(dev)
train_loader = DataLoader(train_set, batch_size=64, shuffle=True, device=dev)
test_loader = DataLoader(test_set, batch_size=500, device=dev)
loss_fn = minicnn.CrossEntropyLoss()
optimizer = minicnn.Adam(model.parameters(), lr=1e-3)
history = minicnn.fit(model, loss_fn, optimizer, train_loader, epochs=EPOCHS,
                      val_loader=test_loader)
'''),
        md('''
Every layer above ran its own forward and backward, the code of `minicnn/layers.py`.
`minicnn.fuse(model)` puts fused modules in place of runs of layers (a convolution with its
ReLU and max pool, ...), holding the same parameters, so the optimizer keeps training them:
'''),
        docs_block("tutorial.md", "fast = minicnn.fuse(model)"),
        md('''
## One epoch by hand

`fit` is a short loop. Written out, with the backward pass that has no autograd behind it:
`loss_fn.backward()` is the gradient of the loss with respect to the logits, and
`model.backward` hands it through the layers in reverse.
'''),
        docs_block("tutorial.md", "model.backward(loss_fn.backward(), input_grad=False)"),
        md('''
## Predictions

`minicnn.predict` runs the model in evaluation mode over the test images in batches and returns
each image's class and the probabilities of all classes; `minicnn.metrics` counts the answers.
'''),
        code('''
pred = minicnn.predict(model, test_loader.images)     # the test images, already on dev
print(f"test accuracy {minicnn.metrics.accuracy(test_loader.labels, pred):.4f}")
print("first ten predicted:", minicnn.to_numpy(pred.classes[:10]))
print("first ten labels:   ", minicnn.to_numpy(test_loader.labels[:10]))
print("their probabilities:", np.round(minicnn.to_numpy(pred.probabilities[:10].max(axis=1)), 3))
'''),
        md("## Training curves and the first layer's filters"),
        code("minicnn.plot.training_curves(history)"),
        code("minicnn.plot.filters(model)          # model[0]: 32 filters of 3x3"),
        md('''
## Save and load

A checkpoint is one `.npz` file, written to a temporary name and renamed, loaded without
pickle; loading checks every name and shape before it writes anything.
'''),
        code('''
minicnn.save(model, "mnist.npz", optimizer=optimizer,
             metadata={"test_accuracy": history["val_accuracy"][-1]})
restored = mnist_cnn().to(dev)
print(minicnn.load(restored, "mnist.npz"))
x = test_loader.images[:8]
assert (minicnn.to_numpy(restored.eval()(x)) == minicnn.to_numpy(model.eval()(x))).all()
'''),
        docs_block("tutorial.md", "minicnn.load(minicnn.models.lenet5(), \"mnist.npz\")"),
        md('''
## Next

`02_cpu_vs_gpu.ipynb` times the same training on both devices and counts the kernels a step
launches; `03_look_inside.ipynb` looks into a trained network: filters, feature maps, its
mistakes and Grad-CAM.
'''),
    ]


def cpu_vs_gpu():
    name = "02_cpu_vs_gpu.ipynb"
    return name, header(name, "CPU vs GPU: the same training on both", '''
The same network, the same seed and the same batches, trained on the CPU (NumPy) and on the GPU
(CuPy and minicnn's CUDA kernels): how long each takes, how far apart their results end, which
kernels a training step launches, and one kernel run on the CPU by minicnn's emulator. The GPU
cells say why they are skipped when there is no GPU.
''') + [
        md("## Settings"),
        code(SETTINGS.replace("\n%matplotlib inline", "") + '''
from minicnn.backend import cuda_unavailable_reason
from minicnn.data import DataLoader, mnist_sample
from minicnn.models import mnist_cnn

STEPS, BATCH = (10, 64) if SMALL else (200, 128)
if SMALL:
    dataset = mnist_sample(train=True)
else:
    try:
        dataset = minicnn.MNIST(train=True)
    except minicnn.DatasetUnavailable as e:
        print(f"MNIST could not be downloaded; the bundled sample stands in for it.\\n{e}")
        dataset = mnist_sample(train=True)
print(f"{STEPS} steps at batch {BATCH} on {len(dataset):,} images")
'''),
        md('''
## What one training step costs

Count the multiply-adds of the convolutions and linear layers, two floating-point operations
each, and the backward as twice the forward:
'''),
        docs_block("cpu-vs-gpu.md", "def training_flops_per_image"),
        md('''
## Timing the CPU

`train` builds the example network from the seed, moves it and the data to `device`, and runs
`steps` training steps: the plain layers, or the fused modules with the one-kernel loss and
Adam (`fused=True`, the fast path). The clock stops after the last loss is read back, which on
a GPU waits for the queued work to finish.
'''),
        code('''
import time


def train(device, steps, batch_size, fused=True, seed=0):
    """(seconds, final loss, parameters as NumPy arrays) of `steps` steps on `device`."""
    minicnn.seed(seed)
    model = mnist_cnn()
    if fused:
        model = minicnn.fuse(model)
    model.to(device)
    optimizer = (minicnn.fused.FusedAdam if fused else minicnn.Adam)(model.parameters(), lr=1e-3)
    loss_fn = minicnn.fused.CrossEntropyLoss() if fused else minicnn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        device=device)
    done, loss = 0, None
    start = time.perf_counter()
    while done < steps:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            optimizer.step()
            done += 1
            if done == steps:
                break
    loss = float(minicnn.to_numpy(loss))          # waits for the device
    seconds = time.perf_counter() - start
    return seconds, loss, [minicnn.to_numpy(p.data) for p in model.parameters()]


print(f"minicnn.tune_process(): {minicnn.tune_process() or 'changed nothing'}")
for fused in (False, True):
    seconds, loss, _ = train("cpu", STEPS, BATCH, fused=fused)
    print(f"cpu, {'fused' if fused else 'plain'} layers: {seconds:6.2f} s "
          f"({STEPS * BATCH / seconds:8,.0f} images/s), final loss {loss:.4f}")
'''),
        md('''
## The kernels

minicnn's GPU code is CUDA C in the `kernels/` folder, one thread per output element, compiled
at run time by NVRTC. The loader reads each kernel's signature from the source:
'''),
        code('''
for path in minicnn.cuda.kernel_files():
    print(f"{path.name:10} {', '.join(minicnn.cuda.signatures(path.name))}")
'''),
        md('''
## A kernel on the CPU: the emulator

The same `.cu` file compiles with the system C++ compiler and a header that stands in for the
CUDA built-ins; the emulator then runs every thread of a launch on the CPU. That is how the
kernels are tested on machines without a GPU. Here `im2col` runs as the GPU runs it, and is
compared with the NumPy code of the same operation:
'''),
        code('''
from minicnn import ops
from minicnn.testing import emulator

reason = emulator.unavailable_reason()
if reason is not None:
    print(f"skipped: the emulator needs a C++ compiler ({reason})")
else:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    cols = ops.im2col_kernel(x, 3, 3, launch=emulator.launch)   # kernels/im2col.cu, by g++
    print(cols.shape, "equal to NumPy's im2col:", np.array_equal(cols, ops.im2col(x, 3, 3)))
'''),
        md('''
## The same training on the GPU

The first run compiles the kernels and warms CuPy's caches, so it is not timed. Both runs
start from the same weights and see the same batches; they do not end bit-identical, because
the GPU's products add in a different order (float32 rounding differs in the last bits).
'''),
        code('''
reason = cuda_unavailable_reason()
if reason is not None:
    print(f"skipped, no usable GPU: {reason}")
else:
    cpu_s, cpu_loss, cpu_params = train("cpu", STEPS, BATCH)
    train("cuda", 5, BATCH)                               # compile and warm up: not timed
    gpu_s, gpu_loss, gpu_params = train("cuda", STEPS, BATCH)
    drift = max(float(np.abs(g - c).max()) for g, c in zip(gpu_params, cpu_params))
    print(f"cpu : {cpu_s:6.2f} s ({STEPS * BATCH / cpu_s:9,.0f} images/s), loss {cpu_loss:.4f}")
    print(f"cuda: {gpu_s:6.2f} s ({STEPS * BATCH / gpu_s:9,.0f} images/s), loss {gpu_loss:.4f}")
    print(f"speed-up {cpu_s / gpu_s:.1f}x; largest parameter difference {drift:.2e}")
'''),
        md('''
The speed-up grows with the batch: at small batches a GPU step costs the time of launching
its kernels, not of its arithmetic.
'''),
        code('''
if reason is not None:
    print(f"skipped, no usable GPU: {reason}")
else:
    for batch in (16, 128, 1024):
        cpu_s = train("cpu", 10, batch)[0]
        gpu_s = train("cuda", 10, batch)[0]
        print(f"batch {batch:5}: cpu {10 * batch / cpu_s:9,.0f} images/s, "
              f"cuda {10 * batch / gpu_s:9,.0f} images/s, speed-up {cpu_s / gpu_s:5.1f}x")
'''),
        md('''
## Kernels launched by one step

Every minicnn kernel goes through `minicnn.cuda.launch`. Put a counter in its place for one
training step of the fused network. CuPy's own elementwise kernels and cuBLAS's products come
on top of these (the CPU vs GPU page of the docs counts them all).
'''),
        code('''
from collections import Counter

from minicnn import cuda


class CountingLauncher:
    """minicnn.cuda.launch, counting the kernels it launches by file and name."""

    def __init__(self, launch):
        self.launch, self.counts = launch, Counter()

    def __call__(self, file, name, n, *args):
        self.counts[f"{file}:{name}"] += 1
        return self.launch(file, name, n, *args)


if reason is not None:
    print(f"skipped, no usable GPU: {reason}")
else:
    counter = CountingLauncher(cuda.launch)
    cuda.launch = counter
    try:
        train("cuda", 1, BATCH)
    finally:
        cuda.launch = counter.launch
    for kernel, count in counter.counts.most_common():
        print(f"{count:3}  {kernel}")
    print(f"{sum(counter.counts.values()):3}  minicnn kernels in one step")
'''),
    ]


def look_inside():
    name = "03_look_inside.ipynb"
    page = "inside.md"
    return name, header(name, "Looking inside a trained CNN", '''
Training curves, the first layer's filters, feature maps, the confusion matrix, the most
confident mistakes, and Grad-CAM heat maps computed with minicnn's hand-written backward
passes. This notebook is the docs page
[Looking inside a trained CNN](https://github.com/{repository}/blob/main/docs/inside.md), with
all of MNIST and, when there is one, a GPU.
'''.format(repository=REPOSITORY)) + [
        md('''
## A model to look at

The example network, trained through `minicnn.fuse(model)`: the fused modules hold the very
same parameters as `model`, whose plain layers are what the pictures below look into. On the
device chosen above; the test images are moved there too.
'''),
        code(SETTINGS),
        code(DATA.replace("from minicnn.models import mnist_cnn\n", '''\
from minicnn import metrics, plot
from minicnn.models import mnist_cnn
''') + '''
model = mnist_cnn().to(dev)
fast = minicnn.fuse(model)                       # trained fast: the same parameters as model
optimizer = minicnn.Adam(model.parameters(), lr=1e-3)
history = minicnn.fit(fast, minicnn.CrossEntropyLoss(), optimizer,
                      DataLoader(train_set, batch_size=64, shuffle=True, device=dev), epochs=3,
                      val_loader=DataLoader(test_set, batch_size=500, device=dev),
                      progress=not SMALL)
test_set = ArrayDataset(minicnn.to_device(test_set.images, dev),
                        minicnn.to_device(test_set.labels, dev))
'''),
    ] + docs_page(page, after=0)


NOTEBOOKS = [tutorial, cpu_vs_gpu, look_inside]


def render(make):
    """(file name, notebook text) of one notebook: cells numbered, no outputs, Colab metadata."""
    nbformat = _nbformat()
    name, cells = make()
    stem = name.split(".")[0]
    for i, cell in enumerate(cells):
        cell.id = f"{stem}-{i:02d}"             # fixed ids: the same text on every run
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",                   # Colab opens it on a GPU runtime when it can
        "colab": {"provenance": [], "gpuType": "T4"},
    })
    nbformat.validate(nb)
    return name, nbformat.writes(nb) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a notebook is not what would be written")
    ap.add_argument("--out", default=str(OUT), help="folder for the notebooks")
    args = ap.parse_args(argv)
    out = Path(args.out)
    stale = []
    for make in NOTEBOOKS:
        name, text = render(make)
        path = out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/make_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
