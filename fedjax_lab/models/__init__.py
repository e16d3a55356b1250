"""Models: flax modules behind one `(init, apply)` wrapper, and the registry the CLI uses.

`Conv` is a drop-in for `flax.linen.Conv` (2-D) whose backward pass stays on XLA:CPU's fast
kernels inside local training's loops; build conv nets on it (conv.py). `Dense` is one for
`flax.linen.Dense` whose kernel gradient stays fast for small minibatches vmapped over a cohort
(dense.py; logistic regression uses it).
"""

from fedjax_lab.models.conv import Conv, conv2d
from fedjax_lab.models.dense import Dense
from fedjax_lab.models.model import DenseSplit, Model, from_flax
from fedjax_lab.models.networks import cifar_cnn, femnist_cnn, logistic_regression, mlp
from fedjax_lab.models.registry import MODELS, REGISTRY, ModelSpec, get_model, model_spec
from fedjax_lab.models.resnet import resnet18_gn
from fedjax_lab.models.split import SplitModel, split_cnn, split_mlp, split_model
from fedjax_lab.models.text import bigram, char_lstm, transformer, word_lstm

__all__ = ["MODELS", "REGISTRY", "Conv", "Dense", "DenseSplit", "Model", "ModelSpec", "SplitModel",
           "bigram", "char_lstm", "cifar_cnn", "conv2d", "femnist_cnn", "from_flax", "get_model",
           "logistic_regression", "mlp", "model_spec", "resnet18_gn", "split_cnn", "split_mlp",
           "split_model", "transformer", "word_lstm"]
