"""Models: flax modules behind one `(init, apply)` wrapper, and the registry the CLI uses."""

from fedjax_lab.models.model import DenseSplit, Model, from_flax
from fedjax_lab.models.networks import femnist_cnn, logistic_regression, mlp
from fedjax_lab.models.split import SplitModel, split_mlp, split_model

MODELS = {
    "logistic": logistic_regression,
    "mlp": mlp,
    "cnn": femnist_cnn,
}


def get_model(name: str, feature_shape, num_classes: int, **options) -> Model:
    """Builds the registered model `name` for examples of `feature_shape`."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; allowed: {', '.join(MODELS)}")
    return MODELS[name](feature_shape, num_classes, **options)


__all__ = ["MODELS", "DenseSplit", "Model", "SplitModel", "femnist_cnn", "from_flax", "get_model",
           "logistic_regression", "mlp", "split_mlp", "split_model"]
