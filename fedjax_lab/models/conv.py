"""A stride-1 "SAME" 2-D convolution whose backward pass XLA:CPU runs fast inside loops.

Local training runs its steps in a `lax.scan`, and on XLA:CPU (jax 0.10) `lax.conv`'s own
gradient convolutions inside a loop body are lowered to a generic loop-nest kernel that is 9-10x
slower than outside loops (shared/XLA_CPU.md: `f01b_i01o->01bf` convolutions instead of the
canonical NHWC/HWIO form the fast YNNPACK kernels take). Here the backward pass is written as two
forward-style NHWC/HWIO convolutions, which stay on the fast path wherever they are traced:

- input gradient: the output gradient convolved with the kernel flipped in space and with its
  input and output channels swapped ("SAME");
- kernel gradient: the padded input with batch and channels swapped, `[C_in, H, W, B]`, convolved
  with the output gradient used as a kernel, `[H, W, B, C_out]`, giving `[C_in, kh, kw, C_out]`.

Both are the exact gradients (same sums, another order of accumulation); tests compare them with
`jax.grad` of `lax.conv` in float64. Odd kernel sizes only, so "SAME" padding is symmetric.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [B, H, W, C_in]` convolved with `kernel [kh, kw, C_in, C_out]`, stride 1, "SAME"."""
    return _conv(x, kernel, "SAME")


def _forward(x, kernel):
    return conv2d_same(x, kernel), (x, kernel)


def _backward(residuals, output_grad):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    input_grad = _conv(output_grad, flipped, "SAME")
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    kernel_grad = _conv(x.transpose(3, 1, 2, 0), output_grad.transpose(1, 2, 0, 3), padding)
    return input_grad, kernel_grad.transpose(1, 2, 0, 3)


conv2d_same.defvjp(_forward, _backward)


class Conv(nn.Module):
    """`flax.linen.Conv(features, kernel_size, padding="SAME")` on `conv2d_same`.

    The parameters (`kernel` in HWIO, `bias`) and their initialisers are flax's, so a model
    built on it initialises exactly as one built on `nn.Conv` under the same module name.
    """

    features: int
    kernel_size: tuple[int, int]
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} is invalid; conv2d_same needs odd "
                             "sizes (symmetric SAME padding)")
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        return conv2d_same(x, kernel) + bias
