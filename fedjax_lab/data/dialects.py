"""`dialects`: a generated non-IID text population, the default next-character task.

Each client writes in its own dialect of one made-up language: a character Markov chain of
order 2 over a 30-symbol alphabet (`DIALECT_VOCABULARY`: a-z, space, '.', ',', "'"), drawn
around a shared chain. With V = 30 symbols, for client c in dialect family g(c):
  shared logits      S[a, b, t] ~ N(0, SHARPNESS^2)                      (order 2, shared)
  family logits      F_g[b, t]  ~ N(0, 1),  client logits E_c[b, t] ~ N(0, 1)
  P_c(t | a, b) = softmax_t(S[a, b, t] + h * (sqrt(r) F_g(c)[b, t] + sqrt(1 - r) E_c[b, t]))
with h = `heterogeneity` and r = `family_share`. The language's grammar (the order-2 part, 27,000
logits) is shared; a dialect changes how each character is continued (an order-1 perturbation,
900 logits per client). h = 0 gives every client the same chain (IID); families are drawn
uniformly. Client sizes are lognormal (sigma 0.5) around `mean_sequences`, at least 2 sequences.
Defaults: 50 clients, T = 80, 40 sequences per client on average (8 to 84 train at seed 0),
h = 1, 4 families, r = 0.5, 20 % of each client's sequences held out for test.

So that both federation and personalisation matter: a client alone holds ~2,300 train tokens
(29 sequences of 80 on average) to learn an order-2 chain of 27,000 logits, which needs the pooled
data (federation), while the pooled data's best single chain misses each dialect's perturbation
(personalisation). Exact Bayes token accuracies at the defaults (data seed 0; pooled over clients,
weighted by their test tokens; seeds 1-4 give 0.426-0.435 and 0.347-0.362):
  own chain     (argmax under the client's own P_c: a personalised model's best)       0.428
  average chain (argmax under the pooled P-bar, then scored under P_c: one global
                 model's best with a two-character context)                             0.348
Measured on the test tokens for comparison (not in metadata): each client's own order-2 counts
of its train split (argmax; a client alone) score 0.314, the counts pooled over every client
0.344. So local < global < personalised, by 3 and 8 points. With h = 0 both Bayes numbers are
0.378 (local counts 0.251, pooled counts 0.372). The pooled P-bar is what a global model trained
on all train data converges to with an order-2 context:
  P-bar(t | a, b) ∝ sum_c n_c pi_c(a, b) P_c(t | a, b),  n_c = the client's train sequences.
"Exact" means the expected accuracy of the argmax under the stationary distribution pi_c of the
client's chain, sum_{a,b} pi_c(a, b) P_c(argmax(a, b) | a, b): each client's text is one stream
started in pi_c, so every position is distributed as pi_c.

Examples are next-character sequences (see `fedjax_lab.core.losses`): a client's stream of
n * T + 1 characters is cut into n sequences, x = stream[k T : k T + T] (float32 ids) and
y = stream[k T + 1 : k T + T + 1] (int32), both [n, T]; no target is ignored. Sequences are then
split per client into train and test (`train_test_split_per_client`).

Pitfalls: the Bayes numbers condition on the two previous characters of the stream; a model
sees only its own sequence, so its first target lacks one character of context (1 target in
T), and a sequence model can infer part of a dialect from the earlier characters of a
sequence, so a global LSTM can beat the average chain somewhat (its families most easily).
Heterogeneity also makes each client's rows more peaked, so the own-chain accuracy rises with h
(0.378, 0.428, 0.477 at h = 0, 1, 1.5) while the average chain's falls (0.378, 0.348, 0.332).
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedDataset, train_test_split_per_client

DIALECT_VOCABULARY = "abcdefghijklmnopqrstuvwxyz .,'"
# Standard deviation of the shared logits: rows peaked enough that the next character is
# predictable (Bayes accuracy ~0.38 at h = 0) yet far from deterministic.
SHARPNESS = 2.0
SIZE_SIGMA = 0.5  # std of the log client sizes


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}; expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def dialect_chains(num_clients: int, heterogeneity: float, num_families: int,
                   family_share: float, rng: np.random.Generator):
    """Each client's transition probabilities P_c(t | a, b), shape [C, V, V, V], and families.

    The shared chain is drawn first, then the family and client perturbations, so a seed gives
    the same shared language whatever the heterogeneity.
    """
    size = len(DIALECT_VOCABULARY)
    shared = rng.normal(0.0, SHARPNESS, (size, size, size))
    family_logits = rng.normal(0.0, 1.0, (num_families, size, size))
    families = rng.integers(0, num_families, num_clients)
    client_logits = rng.normal(0.0, 1.0, (num_clients, size, size))
    dialect = heterogeneity * (np.sqrt(family_share) * family_logits[families]
                               + np.sqrt(1.0 - family_share) * client_logits)
    # dialect[c, b, t] continues character b the same way whatever came before it.
    return _softmax(shared[None] + dialect[:, None]), families


def stationary_pairs(chains: np.ndarray, tolerance: float = 1e-12,
                     max_iterations: int = 10_000) -> np.ndarray:
    """The stationary distribution pi_c(a, b) of each order-2 chain, [C, V, V], by power
    iteration on the pair chain (a, b) -> (b, t)."""
    size = chains.shape[-1]
    pi = np.full(chains.shape[:-1], 1.0 / size ** 2)
    for _ in range(max_iterations):
        new = np.einsum("cab,cabt->cbt", pi, chains)
        if np.abs(new - pi).max() < tolerance:
            return new
        pi = new
    raise RuntimeError("stationary distribution did not converge")  # not seen with SHARPNESS 2


def bayes_accuracies(chains: np.ndarray, stationary: np.ndarray, weights: np.ndarray):
    """Per-client exact expected accuracy of argmax under (own chain, average chain).

    The average chain is the pooled conditional P-bar(t | a, b) ∝ sum_c w_c pi_c(a, b)
    P_c(t | a, b), what a global model trained on data weighted by `weights` predicts.
    """
    own = np.einsum("cab,cab->c", stationary, chains.max(-1))
    pooled = np.einsum("c,cab,cabt->abt", weights, stationary, chains)
    choice = pooled.argmax(-1)
    scored = np.take_along_axis(chains, np.broadcast_to(choice[None, ..., None],
                                                         chains.shape[:-1] + (1,)), -1)[..., 0]
    return own, np.einsum("cab,cab->c", stationary, scored)


def _sample_streams(chains, stationary, lengths, rng) -> list[np.ndarray]:
    """One stream per client of `lengths[c]` characters, started in its stationary pair, all
    clients advanced together (a loop over positions, not over clients)."""
    num_clients, size = chains.shape[0], chains.shape[-1]
    streams = np.zeros((num_clients, int(lengths.max())), np.int64)
    first = [rng.choice(size * size, p=p.ravel() / p.sum()) for p in stationary]
    streams[:, 0], streams[:, 1] = np.divmod(np.asarray(first), size)
    cumulative = np.cumsum(chains, -1)
    clients = np.arange(num_clients)
    uniforms = rng.random(streams.shape)
    for t in range(2, streams.shape[1]):
        rows = cumulative[clients, streams[:, t - 2], streams[:, t - 1]]
        # Inverse CDF; the clip guards a uniform above a row's rounded total.
        streams[:, t] = np.minimum((rows < uniforms[:, t, None]).sum(-1), size - 1)
    return [streams[c, :lengths[c]] for c in range(num_clients)]


def dialects(num_clients: int = 50, *, sequence_length: int = 80, mean_sequences: float = 40.0,
             heterogeneity: float = 1.0, num_families: int = 4, family_share: float = 0.5,
             test_fraction: float = 0.2, seed: int = 0) -> FederatedDataset:
    """Generates the dialects population (see the module docstring).

    Args:
      num_clients: number of clients (writers).
      sequence_length: T, characters per sequence.
      mean_sequences: mean sequences per client (train + test), lognormal sizes, at least 2.
      heterogeneity: h, the scale of the dialect perturbations; 0 = every client one chain.
      num_families: dialect families (clients of a family share part of their perturbation).
      family_share: r in [0, 1], the fraction of the perturbation's variance shared within a
        family (0 = independent dialects, 1 = one dialect per family).
      test_fraction: per-client held-out fraction of sequences, in [0, 1).
      seed: seeds the one `np.random.Generator` behind every draw.

    Returns:
      A `FederatedDataset` named "dialects", clients "writer_000", ...; num_classes = 30.
      metadata: vocabulary, families, the exact Bayes accuracies (own and average chain, pooled
      over the test tokens and per client) and the options.
    """
    _check("num_clients", num_clients, _is_int(num_clients) and num_clients >= 1,
           "an integer >= 1")
    _check("sequence_length", sequence_length, _is_int(sequence_length) and sequence_length >= 1,
           "an integer >= 1")
    _check("mean_sequences", mean_sequences, np.isfinite(mean_sequences) and mean_sequences >= 2,
           "a number >= 2")
    _check("heterogeneity", heterogeneity, np.isfinite(heterogeneity) and heterogeneity >= 0,
           "a finite number >= 0")
    _check("num_families", num_families, _is_int(num_families) and num_families >= 1,
           "an integer >= 1")
    _check("family_share", family_share, 0 <= family_share <= 1, "a fraction in [0, 1]")
    _check("test_fraction", test_fraction, 0 <= test_fraction < 1, "a fraction in [0, 1)")
    rng = np.random.default_rng(seed)
    chains, families = dialect_chains(num_clients, heterogeneity, num_families, family_share,
                                      rng)
    stationary = stationary_pairs(chains)
    # Lognormal with mean `mean_sequences`: E[exp(N(mu, s^2))] = exp(mu + s^2 / 2).
    sizes = np.maximum(np.round(rng.lognormal(np.log(mean_sequences) - SIZE_SIGMA ** 2 / 2,
                                              SIZE_SIGMA, num_clients)), 2).astype(np.int64)
    streams = _sample_streams(chains, stationary, sizes * sequence_length + 1, rng)
    starts = lambda n: np.arange(n)[:, None] * sequence_length + np.arange(sequence_length)
    xs = [stream[starts(n)].astype(np.float32) for stream, n in zip(streams, sizes)]
    ys = [stream[starts(n) + 1].astype(np.int32) for stream, n in zip(streams, sizes)]
    names = tuple(f"writer_{c:03d}" for c in range(num_clients))
    train, test = train_test_split_per_client(xs, ys, names, test_fraction, rng)

    own, average = bayes_accuracies(chains, stationary, train.num_examples.astype(np.float64))
    test_tokens = test.num_examples * sequence_length
    pooled = (lambda a: float(a @ test_tokens / test_tokens.sum())) if test_tokens.sum() \
        else (lambda a: None)
    metadata = {
        "vocabulary": DIALECT_VOCABULARY, "markov_order": 2, "families": families.tolist(),
        "bayes_accuracy": {"own_chain": pooled(own), "average_chain": pooled(average),
                           "own_chain_per_client": own.tolist(),
                           "average_chain_per_client": average.tolist(),
                           "how": "exact expected accuracy of argmax under the stationary "
                                  "distribution, pooled over clients by test tokens"},
        "num_clients": num_clients, "sequence_length": sequence_length,
        "mean_sequences": mean_sequences, "heterogeneity": heterogeneity,
        "num_families": num_families, "family_share": family_share,
        "test_fraction": test_fraction, "seed": seed,
        "source": "generated by fedjax_lab.data.dialects (order-2 character Markov chains)"}
    return FederatedDataset("dialects", train, test, len(DIALECT_VOCABULARY), metadata)
