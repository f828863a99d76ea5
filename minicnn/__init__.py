"""minicnn: a small, fast, from-scratch CNN framework.

NumPy arrays on the CPU, CuPy arrays and hand-written CUDA kernels on NVIDIA GPUs, every backward
pass written out by hand. Public names are re-exported here: ``minicnn.Conv2d``, ``minicnn.Adam``,
``minicnn.fit``, ``minicnn.save`` ...
"""
from . import amp, augment, gradcam, metrics, models, plot
from .amp import GradScaler, autocast
from .backend import (Device, DeviceError, device, get_array_module, get_default_dtype, seed,
                      set_default_dtype, to_device, to_numpy, tune_process)
from .blocks import BasicBlock
from .cifar import CIFAR10, CIFAR10_MEAN, CIFAR10_STD, CIFARFormatError
from .data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST, MNIST_MEAN, MNIST_STD, ArrayDataset,
                   DataLoader, DatasetUnavailable, FashionMNIST, IDXError, mnist_sample, read_idx)
from .fused import fuse
from .inference import Prediction, predict
from .io import CheckpointError, load, save
from .layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Identity, Linear,
                     MaxPool2d, ReLU)
from .losses import CrossEntropyLoss
from .lr_scheduler import CosineAnnealingLR, LRScheduler, OneCycleLR, StepLR
from .module import Module, Parameter, Sequential, ShapeError
from .normalization import BatchNorm1d, BatchNorm2d
from .optim import SGD, Adam, AdamW, Optimizer
from .testing import GradcheckError, gradcheck
from .train import History, evaluate, fit
from .weights import WeightsError, load_torch_weights

__version__ = "0.1.0"

__all__ = [
    "GradScaler",
    "autocast",
    "BasicBlock",
    "AdaptiveAvgPool2d",
    "Identity",
    "BatchNorm1d",
    "BatchNorm2d",
    "WeightsError",
    "load_torch_weights",
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFARFormatError",
    "Device",
    "DeviceError",
    "device",
    "get_array_module",
    "get_default_dtype",
    "seed",
    "set_default_dtype",
    "to_device",
    "to_numpy",
    "tune_process",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "DataLoader",
    "DatasetUnavailable",
    "FashionMNIST",
    "IDXError",
    "mnist_sample",
    "read_idx",
    "CheckpointError",
    "load",
    "save",
    "AvgPool2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "CrossEntropyLoss",
    "CosineAnnealingLR",
    "LRScheduler",
    "OneCycleLR",
    "StepLR",
    "Module",
    "Parameter",
    "Sequential",
    "ShapeError",
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "GradcheckError",
    "gradcheck",
    "History",
    "evaluate",
    "fit",
    "fuse",
    "Prediction",
    "predict",
]
