"""`Conv`, a drop-in for `flax.linen.Conv` (2-D) whose backward pass XLA:CPU runs fast in loops.

Local training runs its steps in a `lax.scan`, and on XLA:CPU (jax 0.10) `lax.conv`'s own
gradient convolutions inside a loop body are lowered to a generic loop-nest kernel that is 9-10x
slower than outside loops (shared/XLA_CPU.md: `f01b_i01o->01bf` convolutions instead of the
canonical NHWC/HWIO form the fast YNNPACK kernels take). `conv2d` writes the backward pass as
two forward-style NHWC/HWIO/NHWC convolutions, which stay on the fast path wherever they are
traced. They are JAX's own transposes of `conv_general_dilated` (`jax/_src/lax/convolution.py`:
`_conv_general_dilated_transpose_lhs` and `_rhs`, with their paddings) with the operands laid
out so that the dimension numbers come out canonical:

- input gradient: the output gradient (dilated by the strides) convolved with the kernel flipped
  in space and with its input and output channels swapped, window strides = input dilation;
- kernel gradient: the input with batch and channels swapped, `[C_in, H, W, B]`, convolved with
  the output gradient used as a kernel, `[H', W', B, C_out]` (kernel dilation = the strides,
  window strides = the kernel dilation), giving `[C_in, kh, kw, C_out]`.

Both are the exact gradients (the same sums in another order of accumulation); tests/test_conv.py
compares them with `jax.grad` of `lax.conv_general_dilated` in float64.

`Conv` has `nn.Conv`'s fields, defaults, parameter names, shapes and initialisers, so a model
built on it initialises exactly as one built on `nn.Conv` under the same module names. Grouped
convolutions (`feature_group_count > 1`) fall back to `lax.conv_general_dilated` and its own
gradient, as `nn.Conv` runs them (slow inside loops on XLA:CPU; the "auto" client execution
warns about it). 1-D and 3-D convolutions are not covered: use `nn.Conv` for them.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")
# `nn.Conv`'s string paddings that pad the input first and then convolve "VALID".
_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}

IntPair = int | Sequence[int]
Padding = str | int | Sequence[int | tuple[int, int]]


class _Geometry(NamedTuple):
    """Everything but the operands, hashable: the custom VJP's non-differentiable argument."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    input_dilation: tuple[int, int]
    kernel_dilation: tuple[int, int]
    precision: Any


def conv2d(x: jax.Array, kernel: jax.Array, strides: IntPair = 1, padding: Padding = "SAME",
           input_dilation: IntPair = 1, kernel_dilation: IntPair = 1,
           precision: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` on NHWC input and an HWIO kernel, with the fast backward pass.

    Args:
        x: `[B, H, W, C_in]`.
        kernel: `[kh, kw, C_in, C_out]`.
        strides: window strides, one int for both spatial axes or a pair.
        padding: "SAME", "SAME_LOWER", "VALID", one int for every side, or `(low, high)` pairs
            (an int in the sequence pads both sides of its axis), as `nn.Conv` takes them
            (`Conv` also takes "CIRCULAR" and "REFLECT").
        input_dilation: `lhs_dilation` (a transposed convolution); string paddings then raise,
            as in `lax.conv_general_dilated`.
        kernel_dilation: `rhs_dilation` (atrous convolution).
        precision: as in `lax.conv_general_dilated`.

    Returns:
        `[B, H', W', C_out]`, exactly `lax.conv_general_dilated`'s output.
    """
    strides, input_dilation, kernel_dilation = (
        _pair(value, name) for value, name in ((strides, "strides"),
                                               (input_dilation, "input_dilation"),
                                               (kernel_dilation, "kernel_dilation")))
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d takes x [B, H, W, C_in] and kernel [kh, kw, C_in, C_out]; got "
                         f"shapes {x.shape} and {kernel.shape}")
    pads = canonicalize_padding(padding, 2)
    if isinstance(pads, str):
        if input_dilation != (1, 1):
            raise ValueError(f"padding={padding!r} with input_dilation={input_dilation} is not "
                             "supported (as in lax.conv_general_dilated); give (low, high) pairs")
        window = [_dilate(k, d) for k, d in zip(kernel.shape[:2], kernel_dilation)]
        pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, pads)
    pads = tuple((int(low), int(high)) for low, high in pads)
    return _conv(x, kernel, _Geometry(strides, pads, input_dilation, kernel_dilation, precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, kernel: jax.Array, geometry: _Geometry) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, geometry.strides, geometry.padding, lhs_dilation=geometry.input_dilation,
        rhs_dilation=geometry.kernel_dilation, dimension_numbers=CHANNELS_LAST,
        precision=geometry.precision)


def _conv_forward(x, kernel, geometry):
    return _conv(x, kernel, geometry), (x, kernel)


def _conv_backward(geometry, residuals, output_grad):
    x, kernel = residuals
    strides, padding, input_dilation, kernel_dilation, precision = geometry
    input_size = [_dilate(n, d) for n, d in zip(x.shape[1:3], input_dilation)]
    window = [_dilate(k, d) for k, d in zip(kernel.shape[:2], kernel_dilation)]
    output_size = [_dilate(n, s) for n, s in zip(output_grad.shape[1:3], strides)]
    lows = [low for low, _ in padding]
    # The paddings of jax's _conv_general_vjp_lhs_padding and _conv_general_vjp_rhs_padding.
    before = [w - low - 1 for w, low in zip(window, lows)]
    input_pads = [(b, n + w - 1 - o - b)
                  for b, n, w, o in zip(before, input_size, window, output_size)]
    kernel_pads = [(low, o - n + b) for low, o, n, b in zip(lows, output_size, input_size, before)]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    input_grad = jax.lax.conv_general_dilated(
        output_grad, flipped, input_dilation, input_pads, lhs_dilation=strides,
        rhs_dilation=kernel_dilation, dimension_numbers=CHANNELS_LAST, precision=precision)
    kernel_grad = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), output_grad.transpose(1, 2, 0, 3), kernel_dilation,
        kernel_pads, lhs_dilation=input_dilation, rhs_dilation=strides,
        dimension_numbers=CHANNELS_LAST, precision=precision)
    return input_grad, kernel_grad.transpose(1, 2, 0, 3)


_conv.defvjp(_conv_forward, _conv_backward)


def _dilate(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _pair(value, name: str) -> tuple[int, int]:
    # None is flax's old sentinel for 1.
    pair = (1, 1) if value is None else (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name}={value!r} is invalid; expected a positive int or two of them "
                         "(a 2-D convolution)")
    return pair


class Conv(nn.Module):
    """`flax.linen.Conv` for 2-D convolutions, on `conv2d` (a backward pass fast inside loops).

    The fields, their defaults and the parameters (`kernel [kh, kw, C_in / groups, features]`,
    `bias [features]`, from `kernel_init` and `bias_init`) are `nn.Conv`'s, and so are the
    paddings ("SAME", "VALID", "CIRCULAR", "REFLECT", ints, `(low, high)` pairs), the input's
    batch axes (none, one or several) and the dtype promotion. `feature_group_count > 1` runs on
    `lax.conv_general_dilated` as in `nn.Conv` (its slow gradient inside loops on XLA:CPU).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: Padding = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: jax.Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    promote_dtype: Callable = nn.dtypes.promote_dtype

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                       else tuple(self.kernel_size))
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size={self.kernel_size!r} is invalid; "
                             "fedjax_lab.models.Conv is 2-D (use flax.linen.Conv for 1-D and 3-D)")
        kernel_dilation = _pair(self.kernel_dilation, "kernel_dilation")
        # nn.Conv's convention: every axis before (H, W, C) is a batch axis.
        batch_shape = inputs.shape[:-3]
        x = inputs.reshape((-1,) + inputs.shape[-3:])
        padding = canonicalize_padding(self.padding, 2)
        if isinstance(padding, str) and padding in _PAD_MODES:
            window = [_dilate(k, d) for k, d in zip(kernel_size, kernel_dilation)]
            x = jnp.pad(x, [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)],
                        mode=_PAD_MODES[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            raise ValueError("padding='CAUSAL' is invalid; it is for 1-D convolutions only")
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"feature_group_count={self.feature_group_count} is invalid; it "
                             f"must divide the input's {in_features} channels")
        kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
        if self.mask is not None and self.mask.shape != kernel_shape:
            raise ValueError(f"mask shape {self.mask.shape} is invalid; expected the kernel's "
                             f"{kernel_shape}")
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel *= self.mask
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.feature_group_count == 1:
            y = conv2d(x, kernel, self.strides, padding, self.input_dilation, kernel_dilation,
                       self.precision)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, _pair(self.strides, "strides"), padding,
                lhs_dilation=_pair(self.input_dilation, "input_dilation"),
                rhs_dilation=kernel_dilation, dimension_numbers=CHANNELS_LAST,
                feature_group_count=self.feature_group_count, precision=self.precision)
        if bias is not None:
            y += bias
        return y.reshape(batch_shape + y.shape[1:])
