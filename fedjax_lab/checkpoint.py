"""Checkpoints of a whole experiment: server state (per-client states included), history, round.

The cohort and every client key are pure functions of (seed, round), so the server state, which
carries its round, plus the seed in the saved configuration is the entire RNG and sampler
position: a resumed run is the uninterrupted run, bit for bit.

Format: flax's msgpack serialisation (plain arrays and strings; loading a checkpoint cannot run
code, unlike pickle) of the state's leaves in tree order, the metrics so far as JSON, followed by
the SHA-256 digest of those bytes so that truncation or corruption is detected rather than
silently loaded. A checkpoint is written to a temporary file, flushed to disk and renamed; the
previous checkpoint is deleted only once the new one is complete.
"""

import hashlib
import json
import os
import re
import tempfile
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

PyTree = Any
FORMAT_VERSION = 1
_DIGEST_BYTES = 32
_NAME = re.compile(r"^round_(\d{8})\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class Checkpoint(NamedTuple):
    """Attributes: state (restored into the template's structure), history, evaluations, path."""

    state: PyTree
    history: list[dict]
    evaluations: list[dict]
    path: str


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_data(leaf) -> np.ndarray:
    return np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def checkpoint_path(folder: str, round_index: int) -> str:
    return os.path.join(folder, f"round_{round_index:08d}.ckpt")


def save(folder: str, state: PyTree, history: list, evaluations: list, keep: int = 2,
         round_index: int | None = None) -> str:
    """Writes the checkpoint of `state` atomically, named by `round_index` (default: the state's
    round; a sweep's stacked states name theirs); keeps the newest `keep`."""
    os.makedirs(folder, exist_ok=True)
    leaves = [_leaf_data(leaf) for leaf in jax.tree.leaves(state)]
    payload = serialization.msgpack_serialize({
        "format": FORMAT_VERSION,
        "leaves": {str(i): leaf for i, leaf in enumerate(leaves)},
        "history": json.dumps(history),
        "evaluations": json.dumps(evaluations),
    })
    if round_index is None:
        round_index = int(np.asarray(state.round))
    path = checkpoint_path(folder, round_index)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.write(hashlib.sha256(payload).digest())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        os.unlink(old)
    return path


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoint files in `folder`, oldest first (temporary files are ignored)."""
    if not os.path.isdir(folder):
        return []
    names = sorted(name for name in os.listdir(folder) if _NAME.match(name))
    return [os.path.join(folder, name) for name in names]


def load(path: str, template: PyTree) -> Checkpoint:
    """Reads `path` into the structure of `template` (e.g. `algorithm.init(key)`).

    Raises:
        CheckpointError: the file is truncated, corrupted, of another format, or holds a state
            whose leaves differ in number, shape or dtype from the template's.
    """
    with open(path, "rb") as f:
        blob = f.read()
    payload, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    if len(blob) <= _DIGEST_BYTES or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted (checksum mismatch)")
    try:
        content = serialization.msgpack_restore(payload)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be decoded: {error}") from None
    if content.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {content.get('format')!r}; "
                              f"expected {FORMAT_VERSION}")
    template_leaves, treedef = jax.tree.flatten(template)
    stored = content["leaves"]
    if len(stored) != len(template_leaves):
        raise CheckpointError(f"checkpoint {path} holds {len(stored)} arrays; the algorithm's "
                              f"state has {len(template_leaves)} (another algorithm or model?)")
    leaves = []
    for i, like in enumerate(template_leaves):
        value = np.asarray(stored[str(i)])
        expected = _leaf_data(like)
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise CheckpointError(
                f"checkpoint {path} array {i} is {value.dtype}{list(value.shape)}; the "
                f"algorithm's state expects {expected.dtype}{list(expected.shape)}")
        # An owned copy, fully transferred before returning: the first round after a resume
        # donates these buffers, and must never race a pending copy from the decoded bytes.
        owned = jax.device_put(np.array(value, copy=True))
        leaves.append(jax.random.wrap_key_data(owned, impl=jax.random.key_impl(like))
                      if _is_key(like) else owned)
    jax.block_until_ready(leaves)
    return Checkpoint(state=jax.tree.unflatten(treedef, leaves),
                      history=json.loads(content["history"]),
                      evaluations=json.loads(content["evaluations"]), path=path)


def load_latest(folder: str, template: PyTree) -> Checkpoint | None:
    """The newest usable checkpoint in `folder`, skipping (with a warning) unusable newer ones."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load(path, template)
        except CheckpointError as error:
            warnings.warn(f"{error}; falling back to the previous checkpoint", stacklevel=2)
    return None
