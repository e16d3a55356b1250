"""A dense layer whose kernel gradient stays fast for the minibatches of local training.

`flax.linen.Dense`'s kernel gradient is a dot contracting over the minibatch, `x^T g`. Vmapped
over a cohort it becomes a batched dot `[C, B, d] x [C, B, k] -> [C, d, k]` with a short
contraction (B = 10), which XLA:CPU runs outside its fast GEMM kernels: 1.4 ms a step at 1,000
clients of logistic regression 60 -> 10, about a third of the round. Written as the sum of the B
outer products x_b g_b^T, unrolled, it is one fused elementwise loop over the gradient: 0.23 ms.
`Dense` takes that path for minibatches of up to `OUTER_PRODUCT_ROWS` rows and keeps the dot
above; the forward pass and the input gradient are `nn.Dense`'s own. It is a drop-in for
`nn.Dense`'s fields `features`, `use_bias`, `kernel_init` and `bias_init`, with the same
parameters (names, shapes, initialisers: the same key gives the same weights). The maths is the
same; the sum's order is not, so a kernel gradient differs from the dot's by float rounding
(float32: about 1e-7 relative). Like `Conv`, it is a `jax.custom_vjp`: reverse mode at any order
and forward over reverse (Per-FedAvg's Hessian-vector products) work; plain forward mode
(`jax.jvp` of the model itself) does not.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Up to this many rows (examples, or examples times positions) the kernel gradient is an
# unrolled sum of outer products; measured on XLA:CPU at B = 10 (benchmarks/RESULTS.md).
OUTER_PRODUCT_ROWS = 16


def _product(x, kernel):
    # nn.Dense's own contraction, so the forward pass is its program.
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel`, contracting the last axis of `x` `[..., d]` with `kernel` `[d, k]`."""
    return _product(x, kernel)


def _forward(x, kernel):
    return _product(x, kernel), (x, kernel)


def _backward(residuals, g):
    x, kernel = residuals
    # Autodiff's own gradients of the product: the input's always, the kernel's above
    # OUTER_PRODUCT_ROWS (bit for bit nn.Dense's there); XLA drops whichever goes unused.
    x_grad, kernel_grad = jax.vjp(_product, x, kernel)[1](g)
    if math.prod(x.shape[:-1]) > OUTER_PRODUCT_ROWS:
        return x_grad, kernel_grad
    rows, row_grads = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    kernel_grad = rows[0][:, None] * row_grads[0][None, :]
    for row, row_grad in zip(rows[1:], row_grads[1:]):
        kernel_grad = kernel_grad + row[:, None] * row_grad[None, :]
    return x_grad, kernel_grad


dense_product.defvjp(_forward, _backward)


class Dense(nn.Module):
    """`flax.linen.Dense` (same parameters and initialisers) computed by `dense_product`."""

    features: int
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        y = dense_product(x, kernel)
        return y if bias is None else y + bias
