"""The drop-in convolution (models/conv.py): `lax.conv`'s values and gradients, `nn.Conv`'s
parameters and outputs, clear errors, and the "auto" warning for `nn.Conv`'s slow gradient."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.core import ClientExecution, local_train, model_loss
from fedjax_lab.models import Conv, conv2d, from_flax
from fedjax_lab.models.conv import CHANNELS_LAST

# (x shape [B, H, W, C_in], kernel shape [kh, kw, C_in, C_out], conv2d's options)
CASES = {
    "odd 5x5 SAME": ((3, 8, 6, 2), (5, 5, 2, 4), {}),
    "3x1 SAME": ((2, 7, 5, 3), (3, 1, 3, 2), {}),
    "stride 2 SAME, non-square": ((2, 9, 7, 2), (3, 3, 2, 3), {"strides": 2}),
    "stride 2 VALID": ((2, 9, 8, 2), (3, 3, 2, 3), {"strides": 2, "padding": "VALID"}),
    "stride 3 VALID, rows left over": ((2, 8, 10, 1), (3, 3, 1, 2),
                                       {"strides": 3, "padding": "VALID"}),
    "even 4x4 explicit asymmetric": ((2, 7, 6, 2), (4, 4, 2, 3),
                                     {"padding": ((1, 2), (0, 1))}),
    "even 2x2 SAME stride 2": ((2, 7, 6, 2), (2, 2, 2, 3), {"strides": 2}),
    "kernel dilation 2 SAME": ((2, 9, 8, 2), (3, 3, 2, 2), {"kernel_dilation": 2}),
    "kernel dilation 2, stride (2, 1), VALID": (
        (2, 11, 9, 2), (3, 2, 2, 3), {"kernel_dilation": 2, "strides": (2, 1),
                                      "padding": "VALID"}),
    "1x1 stride 2": ((3, 8, 8, 4), (1, 1, 4, 5), {"strides": 2}),
    "1x1 batch 1": ((1, 5, 4, 3), (1, 1, 3, 2), {}),
    "input dilation 2, explicit": ((2, 5, 4, 2), (3, 3, 2, 2),
                                   {"input_dilation": 2, "padding": ((2, 1), (0, 2))}),
    "batch 1, stride 2, int padding": ((1, 6, 9, 3), (3, 3, 3, 2),
                                       {"strides": 2, "padding": 1}),
}


def _pair(value):
    return (value, value) if isinstance(value, int) else value


def _lax_conv(options):
    padding = options.get("padding", "SAME")
    if isinstance(padding, int):
        padding = ((padding, padding),) * 2
    return lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, _pair(options.get("strides", 1)), padding,
        lhs_dilation=_pair(options.get("input_dilation", 1)),
        rhs_dilation=_pair(options.get("kernel_dilation", 1)), dimension_numbers=CHANNELS_LAST)


@pytest.mark.parametrize("x_shape, kernel_shape, options", CASES.values(), ids=CASES.keys())
def test_value_and_both_gradients_equal_lax_convs_jitted_and_in_a_scan(x_shape, kernel_shape,
                                                                        options):
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], x_shape, jnp.float64)
        kernel = jax.random.normal(keys[1], kernel_shape, jnp.float64)
        ours, theirs = (lambda a, k: conv2d(a, k, **options)), _lax_conv(options)
        output_shape = jax.eval_shape(theirs, x, kernel).shape
        cotangent = jax.random.normal(keys[2], output_shape, jnp.float64)

        def value_and_grads(conv):
            value, vjp = jax.vjp(conv, x, kernel)
            return (value,) + vjp(cotangent)

        def in_scan(conv):
            return jax.tree.map(lambda leaf: leaf[0], jax.lax.scan(
                lambda carry, _: (carry, value_and_grads(conv)), None, length=1)[1])

        mine, mine_in_scan, reference = jax.jit(lambda: (
            value_and_grads(ours), in_scan(ours), value_and_grads(theirs)))()
        for name, got, scanned, expected in zip(("value", "input grad", "kernel grad"), mine,
                                                mine_in_scan, reference):
            assert got.shape == expected.shape, name
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(scanned, expected, rtol=1e-12, atol=1e-12, err_msg=name)


def test_gradients_in_a_scan_are_forward_style_canonical_convolutions():
    """The point of the custom VJP: no other layout reaches XLA (shared/XLA_CPU.md)."""
    x, kernel = jnp.ones((2, 9, 7, 2)), jnp.ones((3, 3, 2, 3))
    loss = lambda k: jnp.sum(conv2d(x, k, strides=2, kernel_dilation=(1, 2)) ** 2)
    program = jax.make_jaxpr(lambda k: jax.lax.scan(
        lambda carry, _: (carry - jax.grad(loss)(carry), None), k, length=2))(kernel)
    layouts = {str(equation.params["dimension_numbers"])
               for equation in _equations(program.jaxpr) if equation.primitive.name
               == "conv_general_dilated"}
    assert layouts == {str(jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                          CHANNELS_LAST))}


def _equations(jaxpr):
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


# nn.Conv options, and the input shape (several, one or no batch axes).
MODULES = {
    "defaults": ({"features": 4, "kernel_size": (3, 3)}, (2, 8, 6, 3)),
    "5x5 stride 2 VALID": ({"features": 4, "kernel_size": (5, 5), "strides": 2,
                            "padding": "VALID"}, (2, 9, 9, 3)),
    "explicit pads, even kernel, no bias": (
        {"features": 2, "kernel_size": (4, 2), "padding": ((1, 2), 1), "use_bias": False},
        (1, 7, 5, 3)),
    "kernel dilation, initialisers": (
        {"features": 3, "kernel_size": (3, 3), "kernel_dilation": 2,
         "kernel_init": nn.initializers.glorot_uniform(),
         "bias_init": nn.initializers.normal(1.0)}, (2, 9, 8, 2)),
    "circular": ({"features": 2, "kernel_size": (3, 2), "padding": "CIRCULAR", "strides": 2},
                 (2, 6, 7, 3)),
    "reflect": ({"features": 2, "kernel_size": (3, 3), "padding": "REFLECT"}, (2, 6, 5, 3)),
    "groups fall back to lax.conv": ({"features": 4, "kernel_size": (3, 3),
                                      "feature_group_count": 2}, (2, 6, 6, 4)),
    "mask": ({"features": 2, "kernel_size": (2, 2), "mask": jnp.tril(jnp.ones((2, 2, 3, 2)))},
             (2, 5, 5, 3)),
    "input dilation": ({"features": 2, "kernel_size": (3, 3), "input_dilation": 2,
                        "padding": ((1, 1), (2, 0))}, (2, 4, 5, 3)),
    "two batch axes, float16 compute": ({"features": 3, "kernel_size": (3, 3),
                                         "dtype": jnp.float16}, (2, 3, 6, 6, 2)),
    "one example without a batch axis": ({"features": 3, "kernel_size": (3, 3),
                                          "padding": 1}, (6, 5, 2)),
}


@pytest.mark.parametrize("fields, input_shape", MODULES.values(), ids=MODULES.keys())
def test_parameters_and_outputs_equal_flax_convs(fields, input_shape):
    x = jax.random.normal(jax.random.key(1), input_shape)
    ours, theirs = Conv(**fields), nn.Conv(**fields)
    params = ours.init(jax.random.key(2), x)
    jax.tree.map(np.testing.assert_array_equal, params, theirs.init(jax.random.key(2), x))
    mine, reference = jax.jit(lambda v: (ours.apply(v, x), theirs.apply(v, x)))(params)
    assert mine.dtype == reference.dtype and mine.shape == reference.shape
    np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"kernel_size": 3}, r"kernel_size=3 is invalid; fedjax_lab.models.Conv is 2-D"),
    ({"kernel_size": (3, 3, 3)}, r"kernel_size=\(3, 3, 3\) is invalid"),
    ({"kernel_size": (3, 3), "strides": (1, 2, 1)}, r"strides=\(1, 2, 1\) is invalid"),
    ({"kernel_size": (3, 3), "kernel_dilation": 0}, r"kernel_dilation=0 is invalid"),
    ({"kernel_size": (3, 3), "padding": "CAUSAL"}, r"padding='CAUSAL' is invalid"),
    ({"kernel_size": (3, 3), "input_dilation": 2}, r"padding='SAME' with input_dilation"),
    ({"kernel_size": (3, 3), "feature_group_count": 2}, r"feature_group_count=2 is invalid"),
    ({"kernel_size": (3, 3), "mask": jnp.ones((3, 3))}, r"mask shape \(3, 3\) is invalid"),
])
def test_bad_options_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        Conv(features=2, **fields).init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))


class _TwoConvs(nn.Module):
    conv: type

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(4, (3, 3), strides=2)(x.reshape(x.shape[0], 6, 6, 1)))
        return nn.Dense(3)(self.conv(4, (3, 3), padding="VALID")(x).reshape(x.shape[0], -1))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto's CPU choice")
@pytest.mark.parametrize("conv, warns", [(nn.Conv, True), (Conv, False)],
                         ids=["flax.linen.Conv", "fedjax_lab.models.Conv"])
def test_auto_warns_for_flax_convs_gradient_and_not_for_the_drop_in(conv, warns):
    model = from_flax(_TwoConvs(conv), (36,), 3)
    params = model.init(jax.random.key(0))
    per_client = (jnp.zeros((2, 8, 36)), jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool),
                  jax.random.split(jax.random.key(1), 2))

    def client_fn(client):
        return local_train(model_loss(model.apply), optax.sgd(0.1), params, *client,
                           num_epochs=1, batch_size=4).params

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ClientExecution().resolve(client_fn, per_client).strategy == "unrolled"
    slow = [w for w in caught if "fedjax_lab.models.Conv" in str(w.message)]
    assert len(slow) == int(warns)
