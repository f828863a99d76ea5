"""The fast path: fused operations, their kernels, and the CUDA-graph training step.

``minicnn.fused.ops`` holds operations that do in one pass what the plain layers do in several
(bias and ReLU, the loss and its gradient, Adam over every parameter at once), each with a NumPy
reference and a kernel of ``kernels/fused.cu``; ``minicnn.fused.graph`` records a training step
once as a CUDA graph and replays it. Nothing in the plain layers depends on this package.
"""
from .ops import (ADAM_HYPER, TensorTable, adam_hyper, adam_multi_tensor,  # noqa: F401
                  adam_multi_tensor_kernel, bias_relu, bias_relu_kernel, pointer, relu_backward,
                  relu_backward_kernel, softmax_cross_entropy, softmax_cross_entropy_kernel)
