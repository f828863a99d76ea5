"""Ready-made networks: the MNIST example's, LeNet-5, VGG-11 and ResNet-18/34."""
import math

from .backend import rng
from .blocks import BasicBlock, downsample
from .layers import AdaptiveAvgPool2d, AvgPool2d, Conv2d, Flatten, Identity, Linear, MaxPool2d, ReLU
from .module import Module, Sequential
from .normalization import BatchNorm2d


def mnist_cnn(num_classes=10):
    """The example MNIST network: two 3x3 convolutions with max pooling, then two linear layers.

    x (B, 1, 28, 28) -> logits (B, num_classes); 225,034 parameters for 10 classes.
    conv 1->32 (B,32,26,26), pool (B,32,13,13), conv 32->64 (B,64,11,11), pool (B,64,5,5),
    flatten (B,1600), linear 1600->128, linear 128->num_classes.
    """
    return Sequential(
        Conv2d(1, 32, 3), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(64 * 5 * 5, 128), ReLU(),
        Linear(128, num_classes),
    )


# --- LeNet-5, VGG-11 and ResNet-18 ----------------------------------------------------------------

def _init_like_torchvision(model, linear=True):
    """torchvision's initialisation of its CNNs: convolutions kaiming-normal with fan_out (std
    sqrt(2 / (out_channels*kh*kw))) and zero bias, BatchNorm weight 1 and bias 0 (already so), and
    (VGG, ``linear=True``) linear layers N(0, 0.01) with zero bias. Drawn from the one host
    generator (minicnn.seed)."""
    for _, m in model.named_modules():
        if isinstance(m, Conv2d):
            out, _, kh, kw = m.weight.shape
            m.weight.data[...] = rng().normal(0.0, math.sqrt(2.0 / (out * kh * kw)), m.weight.shape)
            if m.bias is not None:
                m.bias.data[...] = 0
        elif isinstance(m, Linear) and linear:
            m.weight.data[...] = rng().normal(0.0, 0.01, m.weight.shape)
            if m.bias is not None:
                m.bias.data[...] = 0


def lenet5(num_classes=10):
    """LeNet-5 (LeCun et al., 1998) for 28x28 images: x (B, 1, 28, 28) -> logits (B, num_classes).

    The first convolution pads by 2, so a 28x28 MNIST digit is seen as the 32x32 input of the
    original. Subsampling is average pooling as in the original; the activations are ReLU (the
    original's scaled tanh is not a minicnn layer). 61,706 parameters for 10 classes.
    conv 1->6 5x5 pad 2 (B,6,28,28), avgpool (B,6,14,14), conv 6->16 5x5 (B,16,10,10),
    avgpool (B,16,5,5), flatten (B,400), linear 400->120, 120->84, 84->num_classes.
    """
    return Sequential(
        Conv2d(1, 6, 5, padding=2), ReLU(), AvgPool2d(2),
        Conv2d(6, 16, 5), ReLU(), AvgPool2d(2),
        Flatten(),
        Linear(16 * 5 * 5, 120), ReLU(),
        Linear(120, 84), ReLU(),
        Linear(84, num_classes),
    )


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(Sequential):
    """VGG for CIFAR-sized images: ``features`` (3x3 convolutions, each followed by BatchNorm when
    ``batch_norm``, then ReLU; "M" is 2x2 max pooling), ``avgpool`` to 1x1, ``flatten`` and a
    linear ``classifier``. A Sequential whose children have names, so ``state_dict`` keys read
    ``features.0.weight`` (numbered as torchvision's ``features``) ... ``classifier.weight``.
    """

    def __init__(self, cfg, num_classes=10, in_channels=3, batch_norm=True):
        layers, channels = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(MaxPool2d(2))
                continue
            layers.append(Conv2d(channels, v, 3, padding=1))
            if batch_norm:
                layers.append(BatchNorm2d(v))
            layers.append(ReLU())
            channels = v
        self.features = Sequential(*layers)
        self.avgpool = AdaptiveAvgPool2d((1, 1))
        self.flatten = Flatten()
        self.classifier = Linear(channels, num_classes)
        _init_like_torchvision(self)


def vgg11(num_classes=10, in_channels=3, batch_norm=True):
    """VGG-11 (configuration "A") with BatchNorm after every convolution (torchvision's
    vgg11_bn features), for CIFAR: x (B, in_channels, 32, 32) -> logits (B, num_classes).

    Five 2x2 poolings take 32x32 to 1x1, so the classifier is one Linear(512, num_classes) instead
    of the ImageNet model's three 4096-wide layers; larger inputs (multiples of 32) are averaged
    to 1x1 first. 9,231,114 parameters for 10 classes (``batch_norm=False``: 9,225,610).
    """
    return VGG(VGG11_CFG, num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm)


class ResNet(Module):
    """ResNet (He et al., 2015) with torchvision's attribute names, so ``state_dict`` keys equal
    torchvision's (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
    ``layer2.0.downsample.0.weight``, ``fc.bias`` ...) and its weights load by name.

        stem:   conv1 -> bn1 -> relu -> maxpool
                ImageNet (cifar_stem=False): 7x7 stride 2 pad 3, maxpool 3x3 stride 2 pad 1,
                x (B, 3, 224, 224) -> (B, 64, 56, 56);
                CIFAR (cifar_stem=True): 3x3 stride 1 pad 1 and no maxpool (Identity),
                x (B, 3, 32, 32) -> (B, 64, 32, 32)
        layer1..layer4: Sequentials of ``block``, 64/128/256/512 planes, the first block of
                layer2..4 with stride 2 and a downsample shortcut
        avgpool (global, to 1x1) -> flatten -> fc: (B, 512) -> (B, num_classes)

    Replace the head after construction as in PyTorch (``model.fc = Linear(512, 2)``): the
    attribute keeps its place, so parameter and state_dict order stay torchvision's.
    """

    def __init__(self, block, layers, num_classes=10, cifar_stem=True, in_channels=3):
        self.in_planes = 64
        if cifar_stem:
            self.conv1 = Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.relu = ReLU()
        self.maxpool = Identity() if cifar_stem else MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = AdaptiveAvgPool2d((1, 1))
        self.fc = Linear(512 * block.expansion, num_classes)
        _init_like_torchvision(self, linear=False)   # torchvision keeps fc at Linear's default

    def _make_layer(self, block, planes, blocks, stride=1):
        shortcut = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            shortcut = downsample(self.in_planes, planes * block.expansion, stride)
        layers = [block(self.in_planes, planes, stride, shortcut)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return Sequential(*layers)

    def _body(self):
        """The layers from the input up to the pooled features, in order."""
        return [self.conv1, self.bn1, self.relu, self.maxpool,
                self.layer1, self.layer2, self.layer3, self.layer4, self.avgpool]

    def output_shape(self, in_shape):
        for layer in self._body():
            in_shape = layer.output_shape(in_shape)
        return self.fc.output_shape((in_shape[0], in_shape[1] * in_shape[2] * in_shape[3]))

    def forward(self, x):
        for layer in self._body():
            x = layer(x)
        if self.training:
            self._cache = x.shape
        return self.fc(x.reshape(x.shape[0], -1))        # torch.flatten(x, 1)

    def backward(self, dy, input_grad=True):
        pooled_shape = self._pop_cache()
        d = self.fc.backward(dy).reshape(pooled_shape)
        body = self._body()
        for layer in reversed(body[1:]):
            d = layer.backward(d)
        return body[0].backward(d, input_grad=input_grad)


def resnet18(num_classes=10, cifar_stem=True, in_channels=3):
    """ResNet-18: BasicBlocks [2, 2, 2, 2]; see ``ResNet`` for the stems and the input shapes.

    cifar_stem=True (default): x (B, 3, 32, 32), 11,173,962 parameters for 10 classes;
    cifar_stem=False: torchvision's resnet18 exactly (x (B, 3, 224, 224); 11,689,512 parameters
    for 1000 classes), so its weights load with ``load_torch_weights``.
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, cifar_stem=cifar_stem,
                  in_channels=in_channels)


def resnet34(num_classes=10, cifar_stem=True, in_channels=3):
    """ResNet-34: BasicBlocks [3, 4, 6, 3]; otherwise as ``resnet18``."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, cifar_stem=cifar_stem,
                  in_channels=in_channels)
