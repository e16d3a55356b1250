"""Models split into a feature extractor (the embedding layer) and a head.

Methods that exchange or regularise features need the embedding e(x) of every example and a head
applied to it: FedGKT (He et al., NeurIPS 2020, arXiv 2007.14513) uploads features, FedProto
(Tan et al., AAAI 2022, arXiv 2105.00243) averages per-class embeddings, and pFedHN-PC (Shamsian
et al., ICML 2021, arXiv 2103.04628) generates only the extractor while each client keeps its own
head. A `SplitModel` is a `Model` (the same `init`, `apply`, `feature_shape`, `num_classes`, so an
algorithm that takes a `Model` takes it) whose parameters are `{"extractor": ..., "head": ...}`,
with the two parts as `Model`s of their own: `extractor.apply(params["extractor"], x)` gives
`[B, latent_dim]` features and `head.apply(params["head"], features)` the logits.

`split_mlp(hidden=(64, 32))` has the layers of `mlp(hidden=(64, 32))`: the features are the last
hidden layer's ReLU output, as in FedProto's reference CNNs, and the head is one dense layer.
"""

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax

from fedjax_lab.models.model import Model, from_flax

PyTree = Any


class SplitModel(NamedTuple):
    """A model over `{"extractor": ..., "head": ...}` parameters, with both parts exposed.

    Attributes:
        init: `init(key) -> {"extractor": ..., "head": ...}`.
        apply: `apply(params, x [B, *feature_shape]) -> logits [B, num_classes]`, the head
            applied to the extractor's features.
        feature_shape: the shape of one example.
        num_classes: the number of output logits.
        extractor: the `Model` from examples to features `[B, latent_dim]`.
        head: the `Model` from features `[B, latent_dim]` to logits.
        latent_dim: D, the width of the features (the embedding layer).
    """

    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, jax.Array], jax.Array]
    feature_shape: tuple[int, ...]
    num_classes: int
    extractor: Model
    head: Model
    latent_dim: int

    def extract(self, params: PyTree, x: jax.Array) -> jax.Array:
        """The features (embeddings) `[B, latent_dim]` of examples `x` under full `params`."""
        return self.extractor.apply(params["extractor"], x)


def split_model(extractor: Model, head: Model) -> SplitModel:
    """Joins an extractor and a head whose input is the extractor's output."""
    if tuple(head.feature_shape) != (extractor.num_classes,):
        raise ValueError(f"head takes features of shape {tuple(head.feature_shape)}; expected "
                         f"({extractor.num_classes},), the extractor's output")

    def init(key):
        extractor_key, head_key = jax.random.split(key)
        return {"extractor": extractor.init(extractor_key), "head": head.init(head_key)}

    def apply(params, x):
        return head.apply(params["head"], extractor.apply(params["extractor"], x))

    return SplitModel(init=init, apply=apply, feature_shape=tuple(extractor.feature_shape),
                      num_classes=head.num_classes, extractor=extractor, head=head,
                      latent_dim=extractor.num_classes)


def split_from_flax(extractor: nn.Module, head: nn.Module, feature_shape, latent_dim: int,
                    num_classes: int) -> SplitModel:
    """Wraps an extractor module (examples -> `latent_dim` features) and a head module."""
    return split_model(from_flax(extractor, feature_shape, latent_dim),
                       from_flax(head, (latent_dim,), num_classes))


class MLPExtractor(nn.Module):
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return x


class LinearHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, features):
        return nn.Dense(self.num_classes)(features)


def split_mlp(feature_shape, num_classes: int, hidden: Sequence[int] = (64, 32)) -> SplitModel:
    """ReLU MLP whose last hidden layer (width `hidden[-1]`) gives the features; linear head."""
    hidden = tuple(hidden)
    if not hidden or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden):
        raise ValueError(f"hidden={hidden!r} is invalid; expected one or more positive widths "
                         "(the last is the feature size)")
    return split_from_flax(MLPExtractor(hidden), LinearHead(num_classes), feature_shape,
                           hidden[-1], num_classes)
