"""Ready-made networks."""
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from .module import Sequential


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
