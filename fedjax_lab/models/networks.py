"""The standard FL models as flax modules, each with a factory returning a `Model`.

- Multinomial logistic regression: FedProx's synthetic "mclr" (Li et al., arXiv 1812.06127); its
  reference declares an L2 regulariser that is never added to the loss, so there is none here.
  Its layer is `dense.Dense` (`nn.Dense`'s parameters, a kernel gradient that stays fast for small
  minibatches vmapped over a cohort).
- MLP: McMahan et al.'s "2NN" (AISTATS 2017) is `mlp(hidden=(200, 200))`.
- FEMNIST CNN (LEAF, Caldas et al., arXiv 1812.01097; McMahan et al.'s "CNN"): 5x5 conv 32, 2x2
  max pool, 5x5 conv 64, 2x2 max pool, dense 2048, dense classes; split around the dense 2048
  layer (`DenseSplit`) for the factored local update. The convolutions are
  `conv.Conv` (`nn.Conv`'s parameters, a backward pass that stays fast inside loops on XLA:CPU) and
  pooling reshapes and takes a max instead of `reduce_window`, whose backward pass is slow on
  XLA:CPU (shared/XLA_CPU.md).
- CIFAR-10 CNN of pfl-research's benchmarks (Granqvist et al., "pfl-research: simulation
  framework for accelerating research in Private Federated Learning", arXiv 2404.06430;
  `benchmarks/model/pytorch/cnn.py: simple_cnn`): 3x3 conv 32, 3x3 conv 64 (both "VALID"), 2x2 max
  pool, dropout 0.25, dense 128, dropout 0.5, dense classes, Glorot-uniform kernels. The
  reference for dropout in training and not in evaluation.

Options that change what training does: `mlp(dropout=...)` (after each hidden layer) and
`mlp(batch_norm=True)` (BatchNorm between each hidden dense layer and its ReLU, with PyTorch's
momentum, batch statistics over the real examples only). See `model.py` for how the training
flag, the dropout key and the BatchNorm statistics reach the modules.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.conv import Conv
from fedjax_lab.models.dense import Dense
from fedjax_lab.models.model import Model, from_flax


class LogisticRegression(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def batch_norm(x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    """BatchNorm over the batch axis (call inside a compact method).

    Training normalises with the statistics of the real examples (`mask`), so padding never
    changes a client's model, and moves the running statistics by 0.1 of the batch's
    (PyTorch's default, `momentum=0.9` in flax's convention: few local steps per round);
    inference uses the running statistics, so one example's prediction never depends on the
    others in its batch.
    """
    if mask is not None:
        # A batch without a real example (a step local_train discards) takes its statistics over
        # all rows, so that the discarded step stays finite (no 0/0 in gradients through it).
        mask = (mask | ~jnp.any(mask)).reshape((-1,) + (1,) * (x.ndim - 1))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=mask)


class MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int
    dropout: float = 0.0
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            # A bias before BatchNorm is cancelled by its mean subtraction.
            x = nn.Dense(width, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = batch_norm(x, train, mask)
            x = nn.relu(x)
            if self.dropout:
                x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes)(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 on NHWC input (an odd last row or column is dropped)."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
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


class CifarCNN(nn.Module):
    num_classes: int
    image_shape: tuple[int, int, int]
    conv_dropout: float = 0.25
    dense_dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0],) + self.image_shape)
        for features in (32, 64):
            # A "VALID" 3x3 convolution is the "SAME" one without its border: the same sums.
            x = Conv(features, (3, 3),
                     kernel_init=nn.initializers.glorot_uniform())(x)[:, 1:-1, 1:-1]
            x = nn.relu(x)
        x = nn.Dropout(self.conv_dropout)(max_pool_2x2(x), deterministic=not train)
        x = nn.relu(nn.Dense(128, kernel_init=nn.initializers.glorot_uniform())(
            x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dense_dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.glorot_uniform())(x)


def check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate!r} is invalid; expected a dropout rate in [0, 1)")


def logistic_regression(feature_shape, num_classes: int) -> Model:
    """Multinomial logistic regression (FedProx's "mclr")."""
    return from_flax(LogisticRegression(num_classes), feature_shape, num_classes)


def mlp(feature_shape, num_classes: int, hidden: Sequence[int] = (200, 200), *,
        dropout: float = 0.0, batch_norm: bool = False) -> Model:
    """ReLU multilayer perceptron; the default widths are McMahan et al.'s 2NN.

    `dropout` drops hidden units at this rate in training; `batch_norm` adds BatchNorm to each
    hidden layer (the model's parameters then hold its running statistics, `Model.mutable`).
    Without either, the parameters are exactly those of the plain MLP.
    """
    check_rate("dropout", dropout)
    return from_flax(MLP(tuple(hidden), num_classes, dropout, batch_norm), feature_shape,
                     num_classes, has_train_mode=dropout > 0 or batch_norm)


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


def femnist_image_shape(feature_shape) -> tuple[int, int, int]:
    """The image shape of the FEMNIST CNN's examples, which it pools twice by 2."""
    shape = image_shape(feature_shape)
    if shape[0] % 4 or shape[1] % 4:
        raise ValueError(f"the CNN pools twice by 2; image shape {shape[:2]} must be "
                         "divisible by 4")
    return shape


def femnist_cnn(feature_shape, num_classes: int) -> Model:
    """LEAF's FEMNIST CNN: two 5x5 convolutions (32, 64) with pooling, dense 2048."""
    return from_flax(FemnistCNN(num_classes, femnist_image_shape(feature_shape)), feature_shape,
                     num_classes, dense_layer="Dense_0")


def cifar_cnn(feature_shape, num_classes: int, *, conv_dropout: float = 0.25,
              dense_dropout: float = 0.5) -> Model:
    """pfl-research's CIFAR-10 benchmark CNN (two dropout layers) for image examples."""
    check_rate("conv_dropout", conv_dropout)
    check_rate("dense_dropout", dense_dropout)
    shape = image_shape(feature_shape)
    if shape[0] < 6 or shape[1] < 6:
        raise ValueError(f"the CIFAR CNN's two 3x3 VALID convolutions and 2x2 pooling need "
                         f"images of at least 6x6; got {shape[:2]}")
    return from_flax(CifarCNN(num_classes, shape, conv_dropout, dense_dropout), feature_shape,
                     num_classes, has_train_mode=conv_dropout > 0 or dense_dropout > 0)
