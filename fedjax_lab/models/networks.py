"""The standard FL models as flax modules, each with a factory returning a `Model`.

- Multinomial logistic regression: FedProx's synthetic "mclr" (Li et al., arXiv 1812.06127); its
  reference declares an L2 regulariser that is never added to the loss, so there is none here.
- MLP: McMahan et al.'s "2NN" (AISTATS 2017) is `mlp(hidden=(200, 200))`.
- FEMNIST CNN (LEAF, Caldas et al., arXiv 1812.01097; McMahan et al.'s "CNN"): 5x5 conv 32, 2x2
  max pool, 5x5 conv 64, 2x2 max pool, dense 2048, dense classes; split around the dense 2048
  layer (`DenseSplit`) for the factored local update. The convolutions are
  `conv.Conv` (flax's parameters, a backward pass that stays fast inside loops on XLA:CPU) and
  pooling reshapes and takes a max instead of `reduce_window`, whose backward pass is slow on
  XLA:CPU (shared/XLA_CPU.md).
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.conv import Conv
from fedjax_lab.models.model import Model, from_flax


class LogisticRegression(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 on NHWC input with even height and width."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class FemnistCNN(nn.Module):
    num_classes: int
    image_shape: tuple[int, int, int]

    def setup(self):
        self.Conv_0 = Conv(32, (5, 5))
        self.Conv_1 = Conv(64, (5, 5))
        self.Dense_0 = nn.Dense(2048)
        self.Dense_1 = nn.Dense(self.num_classes)

    def features(self, x):
        x = x.reshape((x.shape[0],) + self.image_shape)
        x = max_pool_2x2(nn.relu(self.Conv_0(x)))
        x = max_pool_2x2(nn.relu(self.Conv_1(x)))
        return x.reshape(x.shape[0], -1)

    def head(self, z):
        return self.Dense_1(nn.relu(z))

    def __call__(self, x):
        return self.head(self.Dense_0(self.features(x)))


def logistic_regression(feature_shape, num_classes: int) -> Model:
    """Multinomial logistic regression (FedProx's "mclr")."""
    return from_flax(LogisticRegression(num_classes), feature_shape, num_classes)


def mlp(feature_shape, num_classes: int, hidden: Sequence[int] = (200, 200)) -> Model:
    """ReLU multilayer perceptron; the default widths are McMahan et al.'s 2NN."""
    return from_flax(MLP(tuple(hidden), num_classes), feature_shape, num_classes)


def image_shape(feature_shape) -> tuple[int, int, int]:
    """NHWC image shape of an example: (H, W), (H, W, C), or a flattened square grey image."""
    feature_shape = tuple(feature_shape)
    if len(feature_shape) == 3:
        return feature_shape
    if len(feature_shape) == 2:
        return feature_shape + (1,)
    side = math.isqrt(feature_shape[0]) if len(feature_shape) == 1 else 0
    if side * side != (feature_shape[0] if len(feature_shape) == 1 else -1):
        raise ValueError(f"the CNN needs image examples; feature shape {feature_shape} is neither "
                         "(H, W), (H, W, C) nor a flattened square image")
    return (side, side, 1)


def femnist_cnn(feature_shape, num_classes: int) -> Model:
    """LEAF's FEMNIST CNN: two 5x5 convolutions (32, 64) with pooling, dense 2048."""
    shape = image_shape(feature_shape)
    if shape[0] % 4 or shape[1] % 4:
        raise ValueError(f"the CNN pools twice by 2; image shape {shape[:2]} must be "
                         "divisible by 4")
    return from_flax(FemnistCNN(num_classes, shape), feature_shape, num_classes,
                     dense_layer="Dense_0")
