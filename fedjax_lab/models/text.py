"""Next-token models for text: `apply(params, x [B, T]) -> logits [B, T, V]`, causal.

x holds token ids as float32 (every example array is float32; ids below 2^24 are exact); each
model casts them to int32. An id outside [0, V) is not an error inside jit: the embedding lookup
(a gather) clamps it to the nearest valid id, silently, so the data pipeline must keep ids in
range. None of these models has dropout, so training and inference are one function.

Parameter counts (no LSTM has a second bias, unlike PyTorch's `nn.LSTM` with b_ih and b_hh):
char_lstm, V = 80: 817,872 (PyTorch's Embedding(80, 8) + LSTM(8, 256, num_layers=2) +
Linear(256, 80): 819,920, the 2 x 1,024 second biases more); word_lstm, V = 10,004: 4,050,748
(the figure cited for Reddi et al.'s model; not rechecked against the paper); transformer with
its defaults, V = 80: 433,744; bigram, V = 80: 2,640.

Speed of the LSTM. Clients train vmapped (per-client weights: every matmul in the time loop is
a batched one) with local steps in `lax.scan`. The input projections of all T steps are one GEMM
before the loop, the loop holds only h @ W_hh (one [H, 4H] matmul for the four gates) and the
gates, and the backward pass is hand-written (`lstm_scan`) so that dW_hh is one GEMM after the
loop. Measured on char_lstm, V = 80, 10 clients vmapped, each one SGD step on 10 sequences of 80
(forward, backward, update; one jit), ms per step of all 10 clients, median of 5; 2-core AMD
EPYC, XLA:CPU, jax 0.10.2. The machine was shared with other benchmarks (load average 1 to 12
on 2 cores): compare within a column only, and in run A (rows run in the order: unroll 1,
flax, unroll 4, unroll 8) the load rose from 1 to about 9 as it ran.

    | LSTM time loop                                   | run A | run B | run C |
    |--------------------------------------------------|-------|-------|-------|
    | flax nn.RNN(nn.OptimizedLSTMCell)                | 3,350 | 10,644| 3,205 |
    | own scan, autodiff backward, unroll 1            | 1,880 | 6,328 | 2,945 |
    | own scan, autodiff backward, unroll 4 / 8        | 4,359 / 5,451 | 6,663 / - | - |
    | own scan, hand-written backward, unroll 1 (kept) |   -   | 3,391 | 2,300 |
    | own scan, hand-written backward, unroll 4 / 8    |   -   | 6,916 / 6,580 | 2,058 / - |
    | full unroll                                      | compile > 4 min, not run | | |

With the 5 steps in a `lax.scan` (run B, median of 3): autodiff backward 5,788 ms per step, the
hand-written one 2,482. Unrolling the time scan never helped beyond the noise and costs compile
time, so it stays rolled (`UNROLL`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.core.client_execution import RECURRENT_SCOPE
from fedjax_lab.models.model import Model, from_flax
from fedjax_lab.options import OptionError

# The time scan's unroll factor (see the timings in the module docstring).
UNROLL = 1


def token_ids(x: jax.Array) -> jax.Array:
    return x.astype(jnp.int32)


def recurrent_init(key, shape, dtype=jnp.float32):
    """An orthogonal [H, H] block per gate, as flax's `OptimizedLSTMCell` initialises its four
    recurrent kernels, laid side by side as one [H, 4H] kernel."""
    hidden, gates = shape[0], shape[1] // shape[0]
    blocks = [nn.initializers.orthogonal()(k, (hidden, hidden), dtype)
              for k in jax.random.split(key, gates)]
    return jnp.concatenate(blocks, axis=1)


@jax.custom_vjp
def lstm_scan(gate_inputs: jax.Array, recurrent_kernel: jax.Array) -> jax.Array:
    """The LSTM's time loop on precomputed input projections.

    The backward pass is written by hand (`_lstm_backward`) so that the loop carries only
    dh @ W_hh^T; the gradient of W_hh, sum_t h_{t-1}^T dgates_t, is one GEMM over all T steps
    after the loop instead of T small GEMMs accumulated inside it (autodiff's transpose of the
    scan), which is what keeps a vmapped client's backward pass fast (module docstring).

    Args:
        gate_inputs: `[T, B, 4H]`, `x_t @ W_ih + b` for every step (gate order i, f, g, o).
        recurrent_kernel: `[H, 4H]`, W_hh of the four gates side by side.

    Returns:
        The hidden states `[T, B, H]`, from h_0 = c_0 = 0.
    """
    return _lstm_forward(gate_inputs, recurrent_kernel)[0]


def lstm_scan_autodiff(gate_inputs: jax.Array, recurrent_kernel: jax.Array) -> jax.Array:
    """`lstm_scan` differentiated by JAX through the scan (the reference its backward pass is
    tested against)."""
    return _lstm_forward(gate_inputs, recurrent_kernel)[0]


def _lstm_forward(gate_inputs, recurrent_kernel):
    hidden, batch = recurrent_kernel.shape[0], gate_inputs.shape[1]

    def step(carry, gate_input):
        h, c = carry
        gates = gate_input + h @ recurrent_kernel
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, jnp.concatenate([i, f, g, o], axis=-1))

    zeros = jnp.zeros((batch, hidden), gate_inputs.dtype)
    with jax.named_scope(RECURRENT_SCOPE):
        _, (hs, cs, activations) = jax.lax.scan(step, (zeros, zeros), gate_inputs,
                                                unroll=UNROLL)
    return hs, cs, activations


def _lstm_forward_with_residuals(gate_inputs, recurrent_kernel):
    hs, cs, activations = _lstm_forward(gate_inputs, recurrent_kernel)
    return hs, (hs, cs, activations, recurrent_kernel)


def _lstm_backward(residuals, hs_cotangent):
    hs, cs, activations, recurrent_kernel = residuals
    zeros = jnp.zeros_like(hs[0])
    # h_{t-1} and c_{t-1} for every t (h_0 = c_0 = 0).
    previous_hs = jnp.concatenate([zeros[None], hs[:-1]])
    previous_cs = jnp.concatenate([zeros[None], cs[:-1]])

    def step(carry, inputs):
        dh_next, dc_next = carry
        dh_out, c, c_previous, activation = inputs
        i, f, g, o = jnp.split(activation, 4, axis=-1)
        dh = dh_out + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
        dgates = jnp.concatenate([dc * g * i * (1 - i), dc * c_previous * f * (1 - f),
                                  dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        return (dgates @ recurrent_kernel.T, dc * f), dgates

    with jax.named_scope(RECURRENT_SCOPE):
        _, dgates = jax.lax.scan(step, (zeros, zeros),
                                 (hs_cotangent, cs, previous_cs, activations), reverse=True,
                                 unroll=UNROLL)
    kernel_cotangent = jnp.einsum("tbh,tbk->hk", previous_hs, dgates)
    return dgates, kernel_cotangent


lstm_scan.defvjp(_lstm_forward_with_residuals, _lstm_backward)


class LSTM(nn.Module):
    """One LSTM layer over time-major input `[T, B, E] -> [T, B, H]`.

    Maths of flax's `OptimizedLSTMCell` (and PyTorch's `nn.LSTM`, less its second bias):
    gates (i, f, g, o) = x_t W_ih + h_{t-1} W_hh + b; c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);
    h_t = sigma(o) tanh(c_t). Initialisation as flax's cell: W_ih lecun normal, W_hh orthogonal
    per gate, b = 0 (forget gate included).
    """

    hidden: int

    @nn.compact
    def __call__(self, inputs):
        width = inputs.shape[-1]
        input_kernel = self.param("input_kernel", nn.initializers.lecun_normal(),
                                  (width, 4 * self.hidden))
        recurrent_kernel = self.param("recurrent_kernel", recurrent_init,
                                      (self.hidden, 4 * self.hidden))
        bias = self.param("bias", nn.initializers.zeros_init(), (4 * self.hidden,))
        # One GEMM for the input projections of all T steps; only h @ W_hh stays in the loop.
        gate_inputs = inputs @ input_kernel + bias
        return lstm_scan(gate_inputs, recurrent_kernel)


class CharLSTM(nn.Module):
    vocab_size: int
    embed: int = 8
    hidden: int = 256
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        # Time-major from the start: the scan runs over the leading axis without a transpose.
        h = nn.Embed(self.vocab_size, self.embed)(token_ids(x).T)
        for _ in range(self.layers):
            h = LSTM(self.hidden)(h)
        return jnp.swapaxes(nn.Dense(self.vocab_size)(h), 0, 1)


class WordLSTM(nn.Module):
    vocab_size: int
    embed: int = 96
    hidden: int = 670
    projection: int = 96

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(self.vocab_size, self.embed)(token_ids(x).T)
        h = LSTM(self.hidden)(h)
        # Transposed at the narrow projection, before the wide vocabulary layer.
        h = jnp.swapaxes(nn.Dense(self.projection)(h), 0, 1)
        return nn.Dense(self.vocab_size)(h)


class Bigram(nn.Module):
    vocab_size: int
    embed: int = 16

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.vocab_size)(nn.Embed(self.vocab_size, self.embed)(token_ids(x)))


class CausalSelfAttention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        head_width = width // self.heads
        qkv = nn.Dense(3 * width)(x).reshape(batch, length, 3, self.heads, head_width)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_width)
        causal = jnp.tril(jnp.ones((length, length), bool))
        # Masked scores are replaced (not added to), so later positions cannot reach the
        # softmax at all: exp(-inf) = 0 exactly, and the logits at t are bit-identical
        # whatever follows t.
        scores = jnp.where(causal, scores, -jnp.inf)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(width)(attended.reshape(batch, length, width))


class Transformer(nn.Module):
    vocab_size: int
    width: int = 128
    layers: int = 2
    heads: int = 4
    hidden: int = 512
    context: int = 128

    @nn.compact
    def __call__(self, x):
        length = x.shape[1]
        tokens = nn.Embed(self.vocab_size, self.width)(token_ids(x))
        positions = self.param("position_embedding", nn.initializers.normal(0.02),
                               (self.context, self.width))
        h = tokens + positions[:length]
        for _ in range(self.layers):
            h = h + CausalSelfAttention(self.heads)(nn.LayerNorm()(h))
            mlp = nn.Dense(self.width)(nn.gelu(nn.Dense(self.hidden)(nn.LayerNorm()(h))))
            h = h + mlp
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def sequence_length(feature_shape) -> int:
    feature_shape = tuple(feature_shape)
    if len(feature_shape) != 1:
        raise ValueError(f"a text model takes sequences of token ids, feature shape (T,); got "
                         f"{feature_shape}")
    return feature_shape[0]


def char_lstm(feature_shape, vocab_size: int, *, embed: int = 8, hidden: int = 256,
              layers: int = 2) -> Model:
    """LEAF's and fedjax's Shakespeare next-character model: Embed(V, 8), two LSTM(256),
    Dense(V) at every position.

    References: Caldas et al., "LEAF: A Benchmark for Federated Settings" (arXiv 1812.01097);
    fedjax's `models/shakespeare.py` (`create_lstm_model`). Parameter count for V = 80 in the
    module docstring.
    """
    sequence_length(feature_shape)
    return from_flax(CharLSTM(vocab_size, embed, hidden, layers), feature_shape, vocab_size)


def word_lstm(feature_shape, vocab_size: int, *, embed: int = 96, hidden: int = 670,
              projection: int = 96) -> Model:
    """Reddi et al.'s Stack Overflow next-word model: Embed(V, 96), LSTM(670), Dense(96),
    Dense(V) at every position (V = 10,000 words + 4 specials there).

    Reference: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021, arXiv 2003.00295),
    Appendix (Stack Overflow NWP model). 4,050,748 parameters for V = 10,004.
    """
    sequence_length(feature_shape)
    return from_flax(WordLSTM(vocab_size, embed, hidden, projection), feature_shape, vocab_size)


def transformer(feature_shape, vocab_size: int, *, width: int = 128, layers: int = 2,
                heads: int = 4, hidden: int = 512, context: int = 128) -> Model:
    """A small decoder-only causal transformer (GPT-2 style): token and learned positional
    embeddings, pre-LayerNorm blocks of causal multi-head self-attention and a GELU MLP, a final
    LayerNorm, Dense(V).

    References: Vaswani et al., "Attention Is All You Need" (NeurIPS 2017, arXiv 1706.03762);
    Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019) for the
    pre-LayerNorm ordering and learned positions.

    Raises:
        OptionError: on `model.context` when the sequences are longer than the context (the
            positional table has `context` rows), on `model.heads` when it does not divide
            `width`.
    """
    length = sequence_length(feature_shape)
    if length > context:
        raise OptionError("model.context", context, f"sequences of length {length} need a "
                          f"context of at least {length} positions")
    if width % heads:
        raise OptionError("model.heads", heads, f"must divide model.width={width}")
    return from_flax(Transformer(vocab_size, width, layers, heads, hidden, context),
                     feature_shape, vocab_size)


def bigram(feature_shape, vocab_size: int, *, embed: int = 16) -> Model:
    """Embed(V, d) then Dense(V) at each position: the next token from the current one alone.
    A cheap causal baseline, which the test suite uses to run every algorithm on text."""
    sequence_length(feature_shape)
    return from_flax(Bigram(vocab_size, embed), feature_shape, vocab_size)
