"""ResNet-18 with GroupNorm, the CIFAR model of federated-learning papers.

BatchNorm's running statistics do not federate: under non-IID data each client's statistics
describe its own distribution, and averaging them describes none. Hsieh et al. ("The Non-IID
Data Quagmire of Decentralized Machine Learning", ICML 2020, arXiv 1910.00189) replace BatchNorm
by GroupNorm (Wu and He, ECCV 2018, arXiv 1803.08494), and Reddi et al. ("Adaptive Federated
Optimization", ICLR 2021, arXiv 2003.00295) train ResNet-18 with GroupNorm on CIFAR-10/100, two
groups per layer. GroupNorm normalises each example on its own, so an example's logits never
depend on the rest of its batch, padding changes nothing, and there are no statistics to carry.

The network is He et al.'s ResNet-18 (CVPR 2016, arXiv 1512.03385) in the form most FL code uses
for 32x32 images: a 3x3 stride-1 stem (no max pool), four stages of two BasicBlocks (3x3 conv,
GroupNorm, ReLU, 3x3 conv, GroupNorm, plus the shortcut, ReLU) of width w, 2w, 4w, 8w (w = 64),
stride 2 and a 1x1 projection shortcut (conv + GroupNorm) at the first block of stages 2-4,
global average pooling and a dense layer. Convolutions have no bias (the GroupNorm after each
shifts anyway) and torchvision's ResNet initialisation (He normal, fan-out); they are
`fedjax_lab.models.Conv`, whose backward pass stays fast inside XLA:CPU loops (conv.py).
"""

import flax.linen as nn
import jax

from fedjax_lab.models.conv import Conv
from fedjax_lab.models.model import Model, from_flax
from fedjax_lab.models.networks import image_shape
from fedjax_lab.options import OptionError

STAGES = 4
BLOCKS_PER_STAGE = 2
# torchvision's ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    features: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, size, strides: Conv(features, (size, size), strides,
                                                    use_bias=False, kernel_init=_HE_FAN_OUT)
        norm = lambda: nn.GroupNorm(num_groups=self.groups)
        y = nn.relu(norm()(conv(self.features, 3, self.strides)(x)))
        y = norm()(conv(self.features, 3, 1)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, 1, self.strides)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    num_classes: int
    image_shape: tuple[int, int, int]
    width: int = 64
    groups: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0],) + self.image_shape)
        x = Conv(self.width, (3, 3), use_bias=False, kernel_init=_HE_FAN_OUT)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        for stage in range(STAGES):
            for block in range(BLOCKS_PER_STAGE):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, strides, self.groups)(x)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def resnet18_gn(feature_shape, num_classes: int, *, width: int = 64, groups: int = 2) -> Model:
    """ResNet-18 with GroupNorm (`groups` per layer) for image examples; `width` is the first
    stage's (64 in the paper, doubled at each stage)."""
    if width % groups:
        raise OptionError("model.groups", groups, f"must divide model.width={width} (GroupNorm "
                          "splits each layer's channels into groups)")
    return from_flax(ResNet18(num_classes, image_shape(feature_shape), width, groups),
                     feature_shape, num_classes)
