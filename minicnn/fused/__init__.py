"""The fast path: fused modules and their operations, the CUDA-graph training step.

``minicnn.fuse(model)`` (``minicnn.fused.fuse``) returns the model with fused modules
(``minicnn.fused.modules``: ``FusedConv2d``, ``FusedLinear``, ``FusedMaxPool2d``) in place of the
runs of plain layers they replace; ``minicnn.fused.CrossEntropyLoss`` is the loss in one kernel.
``minicnn.fused.windows`` holds the fast variants of the window operations of ``minicnn.ops``
(only the windows a pool reads, rows in window order, a ReLU folded into the max pool, work split
between threads).

``minicnn.fused.ops`` holds operations that do in one pass what the plain layers do in several
(bias and ReLU, the loss and its gradient), each with a NumPy reference and a kernel of
``kernels/fused.cu``; ``minicnn.fused.adam`` holds ``FusedAdam``/``FusedAdamW``, ``optim.Adam``'s
update of every parameter in one launch; ``minicnn.fused.graph`` records a training step once as
a CUDA graph and replays it. Nothing in the plain layers depends on this package.
"""
from .adam import (AdamConstants, FusedAdam, FusedAdamW, TensorTable,  # noqa: F401
                   adam_hyper, adam_multi_tensor, pointer)
from .ops import (bias_relu, bias_relu_kernel, relu_backward, relu_backward_kernel,  # noqa: F401
                  softmax_cross_entropy, softmax_cross_entropy_kernel)
from .fuse import fuse  # noqa: F401
from .losses import CrossEntropyLoss  # noqa: F401
from .modules import FusedConv2d, FusedLinear, FusedMaxPool2d  # noqa: F401
