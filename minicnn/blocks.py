"""Building blocks of larger networks: ResNet's BasicBlock.

A block is a small graph, not a chain, so it cannot be a ``Sequential``: its forward calls its
children in order and its backward calls them in reverse, by hand. Where the graph forks (the
input feeds both the residual branch and the shortcut) the gradients of the two paths add.
"""
from .layers import Conv2d, ReLU
from .module import Module, Sequential, ShapeError
from .normalization import BatchNorm2d


def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution with padding 1 and no bias (the BatchNorm after it has one)."""
    return Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution without bias: the projection of ResNet's shortcut."""
    return Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def downsample(in_planes, planes, stride=1):
    """The shortcut that matches a block's output when it changes size or width:
    Sequential(conv1x1(in_planes, planes, stride), BatchNorm2d(planes)), as torchvision."""
    return Sequential(conv1x1(in_planes, planes, stride), BatchNorm2d(planes))


class BasicBlock(Module):
    """ResNet's basic block (torchvision's ``BasicBlock``, same attribute and state_dict names).

        out = relu(bn1(conv1(x)))          conv1: 3x3, ``stride``      (B, planes, H/s, W/s)
        out = bn2(conv2(out))              conv2: 3x3, stride 1
        y   = relu(out + shortcut(x))      shortcut: identity, or ``downsample`` when given

    x (B, in_planes, H, W) -> y (B, planes, OH, OW), OH = ceil(H / stride). When ``stride != 1``
    or ``in_planes != planes`` the identity cannot be added: pass ``downsample`` (for instance
    ``blocks.downsample(in_planes, planes, stride)``), as torchvision's ``_make_layer`` does.
    """

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, downsample=None):
        if downsample is not None and not isinstance(downsample, Module):
            raise TypeError(f"BasicBlock: downsample must be a Module or None, got "
                            f"{type(downsample).__name__}")
        if downsample is None and (stride != 1 or in_planes != planes):
            raise ValueError(f"BasicBlock: with in_planes={in_planes}, planes={planes}, "
                             f"stride={stride} the identity shortcut does not fit the output; "
                             "pass downsample=minicnn.blocks.downsample(in_planes, planes, stride)")
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = BatchNorm2d(planes)
        self.relu = ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = ReLU()          # torchvision reuses one in-place ReLU; ours cache a mask

    def output_shape(self, in_shape):
        shape = in_shape
        for layer in (self.conv1, self.bn1, self.conv2, self.bn2):
            shape = layer.output_shape(shape)
        shortcut = in_shape if self.downsample is None else self.downsample.output_shape(in_shape)
        if tuple(shortcut) != tuple(shape):
            raise ShapeError(f"BasicBlock: the shortcut gives shape {tuple(shortcut)} but the "
                             f"residual branch {tuple(shape)} for input {tuple(in_shape)}")
        return shape

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        if identity.shape != out.shape:
            raise ShapeError(f"BasicBlock: the shortcut gives shape {tuple(identity.shape)} but "
                             f"the residual branch {tuple(out.shape)} for input {tuple(x.shape)}")
        out += identity
        return self.relu_out(out)

    def backward(self, dy, input_grad=True):
        d = self.relu_out.backward(dy)                 # gradient of out + identity: both get it
        d_branch = self.conv2.backward(self.bn2.backward(d))
        d_branch = self.conv1.backward(self.bn1.backward(self.relu.backward(d_branch)),
                                       input_grad=input_grad)
        if self.downsample is not None:
            d_short = self.downsample.backward(d, input_grad=input_grad)
        else:
            d_short = d
        if not input_grad:
            return None
        d_branch += d_short
        return d_branch

    def extra_repr(self):
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"
