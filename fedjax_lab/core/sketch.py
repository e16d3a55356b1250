"""Count sketch of a vector: linear, mergeable, with median-of-rows point queries.

Reference: Charikar, Chen, Farach-Colton, "Finding Frequent Items in Data Streams", ICALP 2002;
as used by FetchSGD (Rothchild et al., ICML 2020, arXiv 2007.07682) and its reference code
(kiddyboots216/CommEfficient with nikitaivkin/csh `csvec`).

A sketch of v in R^d is an r x c table: row j has a bucket hash h_j: [d] -> [c] and a sign hash
s_j: [d] -> {-1, +1}, and S(v)[j, h_j(l)] += s_j(l) v_l. S is linear (S(a + b) = S(a) + S(b),
S(lam a) = lam S(a)), so the sum of clients' sketches is the sketch of the sum. A point query
estimates v_l as median_j s_j(l) S[j, h_j(l)]; unsketching with k keeps the k coordinates with the
largest estimated magnitude and returns that k-sparse vector of estimates.

Pitfalls avoided: every party must use the same hashes, so they are a pure function of
(dim, rows, columns, seed), drawn inside jit from `jax.random.key(seed)` (independent uniform
buckets and signs, which are at least as random as csvec's 2- and 4-wise polynomial hashes);
the median over an even number of rows is the mean of the two middle values (torch's `median`,
used by csvec, returns the lower one); queries gather one value per row and coordinate, never an
(r, d) buffer per query coordinate.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.core.validation import check_positive_int


class SketchHashes(NamedTuple):
    """Attributes: buckets `[r, d]` int32 in [0, c); signs `[r, d]` int8 in {-1, +1}."""

    buckets: jax.Array
    signs: jax.Array


@dataclasses.dataclass(frozen=True)
class CountSketch:
    """A count sketch shape with shared hashes; tables are plain `[num_rows, num_columns]` arrays.

    Attributes:
        dim: d, the length of sketched vectors.
        num_rows: r, independent hash rows (odd r makes the median a single row's value).
        num_columns: c, buckets per row.
        seed: the hashes' seed, shared by everyone who sketches.
    """

    dim: int
    num_rows: int
    num_columns: int
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "num_rows", "num_columns"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid; expected an integer")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.num_columns)

    def hashes(self) -> SketchHashes:
        """The shared hash functions, a pure function of the sketch's fields."""
        bucket_key, sign_key = jax.random.split(jax.random.key(self.seed))
        buckets = jax.random.randint(bucket_key, (self.num_rows, self.dim), 0, self.num_columns,
                                     dtype=jnp.int32)
        signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (self.num_rows, self.dim)), 1, -1)
        return SketchHashes(buckets, signs.astype(jnp.int8))

    def zeros(self, dtype=None) -> jax.Array:
        """The empty table."""
        return jnp.zeros(self.shape, jnp.result_type(float) if dtype is None else dtype)

    def sketch(self, vector: jax.Array, hashes: SketchHashes | None = None) -> jax.Array:
        """S(vector): the `[r, c]` table of a `[d]` vector."""
        vector = self._check_vector(vector)
        hashes = self.hashes() if hashes is None else hashes
        rows = jnp.arange(self.num_rows)[:, None]
        return jnp.zeros(self.shape, vector.dtype).at[rows, hashes.buckets].add(
            hashes.signs.astype(vector.dtype) * vector[None, :])

    def row_estimates(self, table: jax.Array, hashes: SketchHashes | None = None) -> jax.Array:
        """`[r, d]`: each row's estimate s_j(l) S[j, h_j(l)] of every coordinate."""
        hashes = self.hashes() if hashes is None else hashes
        rows = jnp.arange(self.num_rows)[:, None]
        return hashes.signs.astype(table.dtype) * table[rows, hashes.buckets]

    def query(self, table: jax.Array, hashes: SketchHashes | None = None) -> jax.Array:
        """`[d]` point estimates: the median over rows of `row_estimates`."""
        return jnp.median(self.row_estimates(table, hashes), axis=0)

    def unsketch(self, table: jax.Array, k: int,
                 hashes: SketchHashes | None = None) -> jax.Array:
        """U_k(table): the `[d]` vector holding the k largest-magnitude estimates, 0 elsewhere."""
        return top_k(self.query(table, hashes), k)

    def _check_vector(self, vector) -> jax.Array:
        vector = jnp.asarray(vector)
        if vector.shape != (self.dim,):
            raise ValueError(f"sketched vector has shape {vector.shape}; expected ({self.dim},)")
        return vector


def top_k(vector: jax.Array, k: int) -> jax.Array:
    """The `[d]` vector keeping the k entries of largest magnitude (lowest index wins ties)."""
    check_positive_int("k", k)
    if k > vector.shape[0]:
        raise ValueError(f"k={k} is invalid; expected k <= {vector.shape[0]} (the dimension)")
    _, indices = jax.lax.top_k(jnp.abs(vector), k)
    return jnp.zeros_like(vector).at[indices].set(vector[indices])
