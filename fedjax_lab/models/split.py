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
`split_cnn()` is the FEMNIST CNN (networks.py) split the same way: its features are the ReLU
output of the dense 2048 layer.
"""

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax

from fedjax_lab.compiled import per_structure
from fedjax_lab.models.conv import Conv
from fedjax_lab.models.model import Model, from_flax
from fedjax_lab.models.networks import check_rate, femnist_image_shape, max_pool_2x2

PyTree = Any


class SplitModel(NamedTuple):
    """A model over `{"extractor": ..., "head": ...}` parameters, with both parts exposed.

    Attributes:
        init: `init(key) -> {"extractor": ..., "head": ...}`.
        apply: `apply(params, x [B, *feature_shape], *, train=False, rng=None, mask=None,
            return_state=False) -> logits [B, num_classes]`, the head applied to the
            extractor's features; the keywords are `Model.apply`'s (the parts draw from two
            halves of `rng`; the state is `{"extractor": ..., "head": ...}` with the parts'
            updated collections, empty parts left out).
        feature_shape: the shape of one example.
        num_classes: the number of output logits.
        extractor: the `Model` from examples to features `[B, latent_dim]`.
        head: the `Model` from features `[B, latent_dim]` to logits.
        latent_dim: D, the width of the features (the embedding layer).
    """

    init: Callable[[jax.Array], PyTree]
    apply: Callable[..., Any]
    feature_shape: tuple[int, ...]
    num_classes: int
    extractor: Model
    head: Model
    latent_dim: int

    @property
    def has_train_mode(self) -> bool:
        """Whether training differs from inference in either part (`Model.has_train_mode`)."""
        return self.extractor.has_train_mode or self.head.has_train_mode

    @property
    def has_state(self) -> bool:
        """Whether either part's parameters hold mutable collections (`Model.has_state`)."""
        return self.extractor.has_state or self.head.has_state

    def extract(self, params: PyTree, x: jax.Array) -> jax.Array:
        """The features (embeddings) `[B, latent_dim]` of examples `x` under full `params`."""
        return self.extractor.apply(params["extractor"], x)


def _apply_part(part: Model, params: PyTree, x: jax.Array, train: bool, rng, mask):
    """`(output, updated collections)` of one part; a part without a training mode may be a
    hand-written `apply(params, x)`, so it is called with those two arguments only."""
    if not part.has_train_mode:
        return part.apply(params, x), {}
    return part.apply(params, x, train=train, rng=rng, mask=mask, return_state=True)


@per_structure
def split_model(extractor: Model, head: Model) -> SplitModel:
    """Joins an extractor and a head whose input is the extractor's output (the same parts give
    the same `SplitModel` object, as `from_flax` does)."""
    if tuple(head.feature_shape) != (extractor.num_classes,):
        raise ValueError(f"head takes features of shape {tuple(head.feature_shape)}; expected "
                         f"({extractor.num_classes},), the extractor's output")

    def init(key):
        extractor_key, head_key = jax.random.split(key)
        return {"extractor": extractor.init(extractor_key), "head": head.init(head_key)}

    def apply(params, x, *, train=False, rng=None, mask=None, return_state=False):
        keys = (None, None) if rng is None else tuple(jax.random.split(rng))
        features, extractor_state = _apply_part(extractor, params["extractor"], x, train,
                                                keys[0], mask)
        logits, head_state = _apply_part(head, params["head"], features, train, keys[1], mask)
        state = {part: updated for part, updated in (("extractor", extractor_state),
                                                     ("head", head_state)) if updated}
        return (logits, state) if return_state else logits

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
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return x


class LinearHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, features):
        return nn.Dense(self.num_classes)(features)


def split_mlp(feature_shape, num_classes: int, hidden: Sequence[int] = (64, 32), *,
              dropout: float = 0.0) -> SplitModel:
    """ReLU MLP whose last hidden layer (width `hidden[-1]`) gives the features; linear head.

    `dropout` drops the extractor's hidden units (the features included) at this rate in
    training.
    """
    hidden = tuple(hidden)
    if not hidden or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden):
        raise ValueError(f"hidden={hidden!r} is invalid; expected one or more positive widths "
                         "(the last is the feature size)")
    check_rate("dropout", dropout)
    extractor = from_flax(MLPExtractor(hidden, dropout), feature_shape, hidden[-1],
                          has_train_mode=dropout > 0)
    return split_model(extractor, from_flax(LinearHead(num_classes), (hidden[-1],), num_classes))


class CNNExtractor(nn.Module):
    image_shape: tuple[int, int, int]
    latent_dim: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0],) + self.image_shape)
        for features in (32, 64):
            x = max_pool_2x2(nn.relu(Conv(features, (5, 5))(x)))
        return nn.relu(nn.Dense(self.latent_dim)(x.reshape(x.shape[0], -1)))


def split_cnn(feature_shape, num_classes: int, latent_dim: int = 2048) -> SplitModel:
    """The FEMNIST CNN with its dense layer's ReLU output (width `latent_dim`) as the features."""
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim={latent_dim!r} is invalid; expected a positive integer")
    return split_from_flax(CNNExtractor(femnist_image_shape(feature_shape), latent_dim),
                           LinearHead(num_classes), feature_shape, latent_dim, num_classes)
