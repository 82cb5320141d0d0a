"""The models and the model table: what a convolutional network for MNIST looks like, and nothing else.

Read this first. Each model is an nn.Module that takes normalised (N, 1, 28, 28) images and returns raw
logits (N, 10): the loss belongs to the training script, and writing or reading model files belongs to
checkpoint.py. Each model works out its own flatten size from a dummy input, so changing a layer never means
recomputing a magic number like nn.Linear(9216, 128) by hand.
"""
import math

import torch
import torch.nn as nn

CLASSES = [str(d) for d in range(10)]  # what the ten outputs mean, in order


def _flat_size(features, in_shape=(1, 1, 28, 28)):
    """How many numbers `features` hands the classifier: the size of a dummy input's output, flattened.

    On the meta device (read_checkpoint builds a stranger's model there to learn its shapes without allocating
    them) the dummy input's shape is followed layer by layer instead: PyTorch's meta kernels for convolution,
    batch norm and dropout take about a second to import, and the same arithmetic gives the same number.
    """
    if next(features.parameters()).is_meta:
        return math.prod(_shape_after(features, in_shape)[1:])
    with torch.no_grad():
        return features(torch.zeros(in_shape)).flatten(1).shape[1]


_SHAPE_KEEPING = (nn.ReLU, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)


def _shape_after(layers, shape):
    """The output shape of an nn.Sequential of 2-D conv, max-pool and shape-keeping layers, by PyTorch's formulas."""
    def pair(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    n, c, h, w = shape
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            if isinstance(layer.padding, str):
                raise TypeError(f"no shape rule for padding={layer.padding!r}: add one to cnn_pytorch._shape_after")
            k, s, p, d = (pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
            rounding = math.ceil if getattr(layer, "ceil_mode", False) else math.floor
            h, w = (rounding((size + 2 * p[i] - d[i] * (k[i] - 1) - 1) / s[i]) + 1 for i, size in enumerate((h, w)))
            c = layer.out_channels if isinstance(layer, nn.Conv2d) else c
            if h < 1 or w < 1:
                raise ValueError(f"the input is too small for {layer}")
        elif not isinstance(layer, _SHAPE_KEEPING):
            raise TypeError(f"no shape rule for {type(layer).__name__}: add one to cnn_pytorch._shape_after")
    return n, c, h, w


class SimpleCNN(nn.Module):
    """Two conv blocks (conv3x3 -> ReLU -> maxpool) and a dense layer with dropout: about 1.2M parameters.

    Padding keeps 28x28 through the first conv, so the second conv runs at 14x14: about half the
    multiply-adds of the pytorch/examples net (whose second conv runs at 24x24) for the same size,
    which is what makes one epoch on a 2-core CPU fit in seconds rather than minutes.
    """

    def __init__(self, channels=(32, 64), hidden=384, dropout=0.1, num_classes=10):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(_flat_size(self.features), hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ImprovedCNN(nn.Module):
    """Three conv blocks (two conv-BN-ReLU each, then maxpool and dropout) and two dense layers with dropout.

    About 2.5M parameters; batch norm lets it train at higher learning rates and reach 99.5%+. conv_dropout
    drops whole feature maps after each block, dropout single units before each dense layer.
    """

    def __init__(self, channels=(32, 64, 128), hidden=(1536, 256), dropout=0.4, conv_dropout=0.1, num_classes=10):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += _conv_bn(c_in, c) + _conv_bn(c, c) + [nn.MaxPool2d(2), nn.Dropout2d(conv_dropout)]
            c_in = c
        self.features = nn.Sequential(*layers)
        h1, h2 = hidden
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_size(self.features), h1, bias=False), nn.BatchNorm1d(h1), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h1, h2, bias=False), nn.BatchNorm1d(h2), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (16, 32, 64 channels) and one linear layer: about 29k parameters.

    Built for time to 99%: on a 2-core CPU the cost is the memory traffic of the 28x28 layers, so the first
    block has only 16 channels; batch norm lets one epoch at a high peak rate (--max_lr 0.01) reach 99%.
    """

    def __init__(self, channels=(16, 32, 64), num_classes=10):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += _conv_bn(c_in, c) + [nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(),
                                        nn.Linear(_flat_size(self.features, (1, 1, 28, 28)), num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"simple": SimpleCNN, "improved": ImprovedCNN, "tiny": TinyCNN}


def build_model(name, **model_args):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](**model_args)
