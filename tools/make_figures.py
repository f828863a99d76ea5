"""Draw the figures of docs/convolution.md, kernels.md, inside.md, distributed.md into docs/img/.

    python tools/make_figures.py              # needs matplotlib: pip install -e ".[plot]"
    python tools/make_figures.py --out DIR    # somewhere else

Every number in the figures is computed by minicnn itself (``minicnn.ops.im2col``,
``minicnn.ops.col2im``, the layers' ``output_shape``), so the pictures show what the code does.
The pictures of docs/inside.md are ``minicnn.plot``'s, of the model that page trains, trained
the same way (``inside_run``).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minicnn  # noqa: E402
from minicnn import metrics, ops  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402

plt = None          # matplotlib.pyplot, imported by main() (matplotlib is optional)

FIGURES = ["im2col.png", "col2im_overlap.png", "col2im_gather.png", "im2col_memory.png",
           "inside_training_curves.png", "inside_filters.png", "inside_feature_maps.png",
           "inside_confusion_matrix.png", "inside_worst_examples.png", "inside_grad_cam.png",
           "allreduce.png"]

# the small example of the first figures: one image, 2 channels (a, b) of 4x4, a 2x2 kernel
C, H, W, KH, KW = 2, 4, 4, 2, 2
CHANNEL = "ab"
WINDOW_COLORS = {0: "#f4a261", 4: "#2a9d8f"}        # window (row of cols) -> colour


def _codes():
    """x (1, C, H, W) whose value at (c, h, w) is c*100 + h*W + w, so every entry says where it
    came from."""
    c, h, w = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    return (c * 100 + h * W + w)[None].astype(np.float64)


def _label(code):
    code = int(code)
    return f"{CHANNEL[code // 100]}{code % 100}"


def _grid(ax, values, labels, colors, title):
    """A table of cells with labels and background colours (None: white)."""
    rows, cols = values.shape
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=colors[r][c] or "white",
                                       edgecolor="#555555", linewidth=0.8))
            ax.text(c + 0.5, r + 0.5, labels[r][c], ha="center", va="center", fontsize=8)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _windows_of_pixel(oh_ow, h, w):
    """True when window number ``oh_ow`` of the example covers pixel (h, w)."""
    ow_count = W - KW + 1
    oh, ow = divmod(oh_ow, ow_count)
    return oh <= h < oh + KH and ow <= w < ow + KW


def _headers(ax, shape):
    """Column labels (i, j, c) above a cols matrix of the example, row labels (oh, ow) left."""
    for k in range(shape[1]):
        i, j, c = k // (KW * C), k // C % KW, k % C
        ax.text(k + 0.5, -0.15, f"{i},{j}\n{CHANNEL[c]}", ha="center", va="bottom", fontsize=7)
    ow_count = W - KW + 1
    for r in range(shape[0]):
        ax.text(-0.15, r + 0.5, f"({r // ow_count},{r % ow_count})", ha="right", va="center",
                fontsize=7)
    ax.set_title(ax.get_title(), fontsize=9, pad=24)


def fig_im2col(path):
    """The input planes and the matrix im2col makes of them, two windows coloured."""
    x = _codes()
    cols = ops.im2col(x, KH, KW)                        # (OH*OW, KH*KW*C), columns (i, j, c)
    fig = plt.figure(figsize=(8.6, 3.6))
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 2.3], hspace=0.35, wspace=0.15)
    for c in range(C):
        ax = fig.add_subplot(gs[c, 0])
        colors = [[None] * W for _ in range(H)]
        for row, color in WINDOW_COLORS.items():
            for h in range(H):
                for w in range(W):
                    if _windows_of_pixel(row, h, w):
                        colors[h][w] = color
        labels = [[_label(x[0, c, h, w]) for w in range(W)] for h in range(H)]
        _grid(ax, x[0, c], labels, colors, f"channel {CHANNEL[c]} of x (B=1, C=2, 4x4)")
    ax = fig.add_subplot(gs[:, 1])
    colors = [[WINDOW_COLORS.get(r)] * cols.shape[1] for r in range(cols.shape[0])]
    labels = [[_label(v) for v in row] for row in cols]
    _grid(ax, cols, labels, colors,
          "cols = im2col(x, 2, 2): one row per window (b, oh, ow), columns (i, j, c)")
    _headers(ax, cols.shape)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def fig_col2im_overlap(path):
    """How many windows cover each pixel: col2im of a matrix of ones, for three geometries."""
    cases = [((3, 3), (1, 1), "3x3 kernel, stride 1"), ((3, 3), (2, 2), "3x3 kernel, stride 2"),
             ((2, 2), (2, 2), "2x2 kernel, stride 2")]
    fig, axes = plt.subplots(1, 3, figsize=(8.6, 3.0))
    for ax, ((kh, kw), stride, title) in zip(axes, cases):
        shape = (1, 1, 6, 6)
        oh, ow = ops.out_size(6, kh, stride[0], 0), ops.out_size(6, kw, stride[1], 0)
        count = ops.col2im(np.ones((oh * ow, kh * kw)), shape, kh, kw, stride)[0, 0]
        ax.imshow(count, cmap="Blues", vmin=0, vmax=9)
        for h in range(6):
            for w in range(6):
                ax.text(w, h, f"{count[h, w]:.0f}", ha="center", va="center", fontsize=9,
                        color="white" if count[h, w] > 5 else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title}\n(windows per pixel of a 6x6 input)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def fig_col2im_gather(path):
    """The entries of cols one col2im thread reads: those im2col copied from its pixel."""
    x = _codes()
    cols = ops.im2col(x, KH, KW)
    pixel = (0, 1, 1)                                   # channel a, h=1, w=1
    code = pixel[0] * 100 + pixel[1] * W + pixel[2]
    fig = plt.figure(figsize=(8.6, 2.9))
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 2.3], wspace=0.15)
    ax = fig.add_subplot(gs[0, 0])
    colors = [[None] * W for _ in range(H)]
    colors[pixel[1]][pixel[2]] = "#e76f51"
    _grid(ax, x[0, 0], [[_label(x[0, 0, h, w]) for w in range(W)] for h in range(H)], colors,
          "dx[0, a, 1, 1]: one col2im thread")
    ax = fig.add_subplot(gs[0, 1])
    colors = [["#e76f51" if v == code else None for v in row] for row in cols]
    _grid(ax, cols, [[_label(v) for v in row] for row in cols], colors,
          "the 4 entries of dcols it adds, kernel offsets (i, j) ascending")
    _headers(ax, cols.shape)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def im2col_sizes(batch):
    """[(layer, input bytes, cols bytes, output bytes)] of the example network's convolutions,
    float32, at ``batch``."""
    rows, shape = [], (batch, 1, 28, 28)
    for i, layer in enumerate(mnist_cnn()):
        out = layer.output_shape(shape)
        if type(layer).__name__ == "Conv2d":
            kh, kw = layer.kernel_size
            cols = out[0] * out[2] * out[3] * kh * kw * shape[1]
            rows.append((f"model[{i}]: Conv2d({shape[1]}, {out[1]}, {kh})", 4 * int(np.prod(shape)), 4 * cols,
                         4 * int(np.prod(out))))
        shape = out
    return rows


def fig_im2col_memory(path, batch=128):
    rows = im2col_sizes(batch)
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    names = [r[0] for r in rows]
    width = 0.26
    for k, (what, color) in enumerate([("input x", "#8ab17d"), ("cols (im2col)", "#e76f51"),
                                       ("output y", "#287271")]):
        mb = [r[1 + k] / 2**20 for r in rows]
        bars = ax.bar(np.arange(len(rows)) + (k - 1) * width, mb, width, label=what, color=color)
        for b, v in zip(bars, mb):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(np.arange(len(rows)), names)
    ax.set_ylabel("MiB (float32)")
    ax.set_title(f"The example network's convolutions at batch {batch}", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)



# --- docs/inside.md: a trained model seen through minicnn.plot ---------------------------------

_INSIDE = {}


def inside_run():
    """The model, history, test set, predictions and confusion matrix of docs/inside.md, made
    as its first two blocks make them (seed 0, the first 2,000 bundled training images, three
    epochs of the fused network); computed once for all its figures."""
    if not _INSIDE:
        from minicnn.data import ArrayDataset, DataLoader, mnist_sample
        minicnn.seed(0)
        train_set = ArrayDataset(*mnist_sample(train=True)[:2000])
        test_set = mnist_sample(train=False)
        model = mnist_cnn()
        fast = minicnn.fuse(model)
        optimizer = minicnn.Adam(model.parameters(), lr=1e-3)
        history = minicnn.fit(fast, minicnn.CrossEntropyLoss(), optimizer,
                              DataLoader(train_set, batch_size=64, shuffle=True), epochs=3,
                              val_loader=DataLoader(test_set, batch_size=500), progress=False,
                              verbose=False)
        pred = minicnn.predict(model, test_set.images)
        _INSIDE.update(model=model, history=history, test_set=test_set, pred=pred,
                       cm=metrics.confusion_matrix(test_set.labels, pred, num_classes=10))
    return _INSIDE


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})


def fig_inside_training_curves(path):
    _save(minicnn.plot.training_curves(inside_run()["history"]), path)


def fig_inside_filters(path):
    _save(minicnn.plot.filters(inside_run()["model"]), path)


def fig_inside_feature_maps(path):
    run = inside_run()
    _save(minicnn.plot.feature_maps(run["model"], run["test_set"].images[0], layer=1), path)


def fig_inside_confusion_matrix(path):
    _save(minicnn.plot.confusion_matrix(inside_run()["cm"]), path)


def fig_inside_worst_examples(path):
    run = inside_run()
    _save(minicnn.plot.worst_examples(run["pred"], run["test_set"].images,
                                      run["test_set"].labels, k=8), path)


def fig_inside_grad_cam(path):
    run = inside_run()
    _save(minicnn.plot.grad_cam(run["model"], run["test_set"].images[:8]), path)


def fig_allreduce(path):
    """One data-parallel step of docs/distributed.md: two processes, their gradients in one flat
    buffer each (the batch size in its last slot), one all-reduce, the same result on both. The
    segments are the example network's parameters, named and counted by minicnn."""
    cells = [f"{name}\n{p.size:,}" for name, p in mnist_cnn().named_parameters()] + ["B_r\n1"]
    colors = ["#a8dadc"] * (len(cells) - 1) + ["#f4a261"]
    fig, ax = plt.subplots(figsize=(11.5, 4.4))
    ax.set_xlim(0, 24)
    ax.set_ylim(0.2, 9.4)
    ax.axis("off")
    arrow = dict(arrowstyle="->", color="#264653", lw=1.4)

    def bar(x0, y, widths, labels, fills, fontsize):
        for w, label, fill in zip(widths, labels, fills):
            ax.add_patch(plt.Rectangle((x0, y), w, 0.9, facecolor=fill, edgecolor="#555555",
                                       linewidth=0.8))
            ax.text(x0 + w / 2, y + 0.45, label, ha="center", va="center", fontsize=fontsize)
            x0 += w
        return x0

    for y, r in ((6.6, 0), (1.6, 1)):
        ax.text(0.1, y + 1.7, f"process {r}", fontsize=10, fontweight="bold")
        ax.text(0.1, y + 1.3, f"B{r} samples of batch k\nforward, backward:\n"
                f"grad{r}, their mean", fontsize=8, va="top")
        ax.text(3.8, y + 1.05, f"one flat buffer holds B{r} x grad{r}, then B{r} "
                "(each Parameter.grad is a view into it)", fontsize=8, va="bottom")
        end = bar(3.8, y, [1.1] * len(cells), cells, colors, 6)
        ax.annotate("", xy=(15.0, 4.9), xytext=(end + 0.1, y + 0.45), arrowprops=arrow)
        ax.annotate("", xy=(17.0, y + 0.45), xytext=(15.9, 4.9), arrowprops=arrow)
        ax.text(17.0, y + 1.05, f"process {r} gets the same bits", fontsize=8, va="bottom")
        bar(17.0, y, [4.6, 1.6], ["sum over r of B_r x grad_r", "B0 + B1"],
            [colors[0], colors[-1]], 7.5)
        ax.text(17.0, y - 0.15, "divided by B0 + B1: the mean gradient of the whole\nbatch, "
                "so every process takes the same step", fontsize=7.5, va="top")
    ax.add_patch(plt.Circle((15.45, 4.9), 0.55, facecolor="#e9c46a", edgecolor="#555555"))
    ax.text(15.45, 4.9, "sum", ha="center", va="center", fontsize=9, fontweight="bold")
    ax.text(8.75, 4.9, "one all-reduce per step (a sum over the processes):\n"
            "MPI Allreduce on CPUs, NCCL allReduce on GPUs", ha="center", va="center",
            fontsize=8.5)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def main(argv=None):
    global plt
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNG files")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in zip(FIGURES, [fig_im2col, fig_col2im_overlap, fig_col2im_gather,
                                    fig_im2col_memory, fig_inside_training_curves,
                                    fig_inside_filters, fig_inside_feature_maps,
                                    fig_inside_confusion_matrix, fig_inside_worst_examples,
                                    fig_inside_grad_cam, fig_allreduce]):
        draw(out / name)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
