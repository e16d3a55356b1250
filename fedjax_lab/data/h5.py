"""Loaders for the HDF5 files of TensorFlow Federated (and early fedjax): EMNIST, Shakespeare,
Stack Overflow.

Layout (TFF `HDF5ClientData`): a group `examples` with one group per client id, holding one
dataset per feature, all of the same length: `examples/<client_id>/<feature>`. Features used:
  EMNIST (fed_emnist[_digitsonly]_{train,test}.h5): `pixels` float32 [n, 28, 28], `label` [n];
  Shakespeare (shakespeare_{train,test}.h5): `snippets` [n] byte strings;
  Stack Overflow (stackoverflow_{train,held_out,test}.h5): `tokens` [n] space-separated words.
Other features in a group are not read. Users who have these files can load them; nothing is
downloaded, and the loaders only read.

Examples are one label each (`ClientBatch.y` is [C, N]), so the text sets become next-token
windows, as LEAF's Shakespeare is:
  Shakespeare: a client's snippets joined by single spaces; every window of `sequence_length`
    characters is an example and the next character its label (stride 1). Characters index
    `vocabulary`, by default the 86 symbols of TFF's Shakespeare tutorial.
  Stack Overflow: each post becomes [BOS] + word ids + [EOS], with fedjax's ids (PAD 0, BOS 1,
    EOS 2, the vocabulary's words 3.., one out-of-vocabulary id last). Target j of a post (its
    first `sequence_length` targets, as fedjax truncates) is an example whose x is the ids
    before it, left-padded with PAD to `sequence_length`: the same predictions a causal model
    makes over fedjax's truncated [N, sequence_length] sequences.
A text client with no window in train is dropped from both splits and listed in
`metadata["dropped_clients"]`.

Bad input is a `DataFormatError` naming the file, the client and the feature: a file that is not
HDF5, a missing `examples` group, a missing client group or feature, features of different
lengths, an empty client, a test client not in train, a character outside the vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_lab.data.federated import ClientData, FederatedDataset
from fedjax_lab.data.leaf import DataFormatError, encode_characters

TFF_SHAKESPEARE_VOCABULARY = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
                              "aeimquyAEIMQUY]!%)-159\r")
PAD, BOS, EOS = 0, 1, 2


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 files needs h5py: pip install h5py "
                          "(or pip install 'fedjax_lab[data]')") from None
    return h5py


def read_h5_clients(path: str, features: Sequence[str],
                    client_ids: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """`{client_id: {feature: array}}` from `examples/<client_id>/<feature>` of `path`.

    Args:
      path: the HDF5 file.
      features: the features to read; every client must have them all, of one length.
      client_ids: the clients to read, in this order; all of the file's (sorted) when None.
    """
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"HDF5 file {path!r} does not exist") from None
    except OSError as error:
        raise DataFormatError(f"{path}: not a readable HDF5 file ({error})") from None
    with handle:
        examples = handle.get("examples")
        if not isinstance(examples, h5py.Group):
            raise DataFormatError(f"{path}: no group 'examples'; expected the TFF layout "
                                  "examples/<client_id>/<feature>")
        ids = sorted(examples) if client_ids is None else list(client_ids)
        clients = {}
        for client_id in ids:
            group = examples.get(client_id)
            if not isinstance(group, h5py.Group):
                raise DataFormatError(f"{path}: client {client_id!r} has no group "
                                      f"'examples/{client_id}'")
            arrays = {}
            for feature in features:
                dataset = group.get(feature)
                if not isinstance(dataset, h5py.Dataset):
                    raise DataFormatError(f"{path}: client {client_id!r} has no feature "
                                          f"{feature!r} (group 'examples/{client_id}' holds "
                                          f"{sorted(group)})")
                arrays[feature] = dataset[()]
            lengths = {feature: len(a) if np.ndim(a) else 0 for feature, a in arrays.items()}
            if len(set(lengths.values())) > 1:
                raise DataFormatError(f"{path}: client {client_id!r}: features have different "
                                      f"lengths {lengths}; expected one length")
            if not next(iter(lengths.values()), 0):
                raise DataFormatError(f"{path}: client {client_id!r} has no examples (empty "
                                      "client)")
            clients[client_id] = arrays
    return clients


def _pair(name: str, train: dict, test: dict, train_path: str, test_path: str, feature_shape,
          num_classes: int, metadata: dict) -> FederatedDataset:
    """A `FederatedDataset` of train clients {id: (x, y)}; test clients must be train clients."""
    for client_id in test:
        if client_id not in train:
            raise DataFormatError(f"{test_path}: client {client_id!r} is in the test file but "
                                  f"not in {train_path}")
    names = tuple(train)
    empty = (np.zeros((0, *feature_shape), np.float32), np.zeros(0, np.int32))
    test = {client_id: test.get(client_id, empty) for client_id in names}
    for split, clients, path in (("train", train, train_path), ("test", test, test_path)):
        for client_id, (_, y) in clients.items():
            bad = y[(y < 0) | (y >= num_classes)]
            if bad.size:
                raise DataFormatError(f"{path}: client {client_id!r}: label {int(bad[0])} "
                                      f"outside [0, {num_classes}) in {split}")
    as_clients = lambda d: ClientData(tuple(d[c][0] for c in names),
                                      tuple(d[c][1] for c in names), names)
    return FederatedDataset(name, as_clients(train), as_clients(test), num_classes, metadata)


def load_emnist_h5(train_path: str, test_path: str, *, num_classes: int = 62,
                   client_ids: Sequence[str] | None = None) -> FederatedDataset:
    """Federated EMNIST (TFF `fed_emnist_{train,test}.h5`; 10 classes for the digits-only files).

    x float32 [n, 28, 28] (`pixels` as stored), y int32 (`label`).
    """
    def read(path, ids):
        return {c: (np.asarray(f["pixels"], np.float32), np.asarray(f["label"]).astype(np.int32))
                for c, f in read_h5_clients(path, ("pixels", "label"), ids).items()}

    train, test = read(train_path, client_ids), read(test_path, _in_file(client_ids, test_path))
    shape = next(iter(train.values()))[0].shape[1:]
    return _pair("emnist_h5", train, test, train_path, test_path, shape, num_classes,
                 {"train_path": train_path, "test_path": test_path,
                  "source": "TensorFlow Federated EMNIST HDF5 (examples/<client>/pixels,label)"})


def _client_ids(path: str) -> set[str]:
    h5py = _h5py()
    with h5py.File(path, "r") as handle:
        return set(handle["examples"]) if "examples" in handle else set()


def _in_file(client_ids: Sequence[str] | None, path: str) -> list[str] | None:
    """The requested clients that `path` holds (all of its clients when none are requested)."""
    if client_ids is None:
        return None
    present = _client_ids(path)
    return [c for c in client_ids if c in present]


def _decode(values, path: str, client_id: str, feature: str) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: client {client_id!r}: feature {feature!r} is not UTF-8 "
                              "text") from None


def load_shakespeare_h5(train_path: str, test_path: str, *, sequence_length: int = 80,
                        vocabulary: str = TFF_SHAKESPEARE_VOCABULARY,
                        client_ids: Sequence[str] | None = None) -> FederatedDataset:
    """Federated Shakespeare (TFF `shakespeare_{train,test}.h5`) as next-character windows.

    x: `sequence_length` character indices (float32, exact), y: the next character's index.
    """
    def windows(path, ids):
        out = {}
        for client_id, f in read_h5_clients(path, ("snippets",), ids).items():
            text = " ".join(_decode(f["snippets"], path, client_id, "snippets"))
            codes = encode_characters(text, vocabulary,
                                      f"{path}: client {client_id!r}: feature 'snippets'")
            count = len(codes) - sequence_length
            if count > 0:
                starts = np.arange(count)[:, None] + np.arange(sequence_length)
                out[client_id] = (codes[starts].astype(np.float32), codes[sequence_length:])
        return out

    train, test = windows(train_path, client_ids), windows(test_path,
                                                           _in_file(client_ids, test_path))
    every = client_ids if client_ids is not None else sorted(_client_ids(train_path))
    dropped = [c for c in every if c not in train]
    test = {c: v for c, v in test.items() if c not in dropped}
    return _pair("shakespeare_h5", train, test, train_path, test_path, (sequence_length,),
                 len(vocabulary), {"train_path": train_path, "test_path": test_path,
                                   "sequence_length": sequence_length, "vocabulary": vocabulary,
                                   "dropped_clients": dropped,
                                   "source": "TensorFlow Federated Shakespeare HDF5"})


def load_stackoverflow_h5(train_path: str, test_path: str, vocabulary: Sequence[str], *,
                          sequence_length: int = 20,
                          client_ids: Sequence[str] | None = None) -> FederatedDataset:
    """Stack Overflow (TFF `stackoverflow_{train,test}.h5`) as next-word examples.

    Args:
      vocabulary: the words, most frequent first (e.g. the first 10 000 lines of TFF's
        `stackoverflow.word_count`), without special tokens; num_classes = len + 4.
      sequence_length: fedjax's max_length (20 for training in its examples).
    """
    lookup = {word: i + 3 for i, word in enumerate(vocabulary)}
    out_of_vocabulary = len(vocabulary) + 3

    def examples(path, ids):
        out = {}
        for client_id, f in read_h5_clients(path, ("tokens",), ids).items():
            xs, ys = [], []
            for post in _decode(f["tokens"], path, client_id, "tokens"):
                ids_ = [BOS] + [lookup.get(w, out_of_vocabulary) for w in post.split()] + [EOS]
                for j in range(1, min(len(ids_), sequence_length + 1)):
                    xs.append([PAD] * (sequence_length - j) + ids_[:j])
                    ys.append(ids_[j])
            out[client_id] = (np.asarray(xs, np.float32), np.asarray(ys, np.int32))
        return out

    train = examples(train_path, client_ids)
    test = examples(test_path, _in_file(client_ids, test_path))
    return _pair("stackoverflow_h5", train, test, train_path, test_path, (sequence_length,),
                 len(vocabulary) + 4, {"train_path": train_path, "test_path": test_path,
                                       "sequence_length": sequence_length,
                                       "vocabulary_size": len(vocabulary),
                                       "special_ids": {"pad": PAD, "bos": BOS, "eos": EOS,
                                                       "out_of_vocabulary": out_of_vocabulary},
                                       "source": "TensorFlow Federated Stack Overflow HDF5"})
