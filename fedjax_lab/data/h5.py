"""Loaders for the HDF5 files of TensorFlow Federated (and early fedjax): EMNIST, Shakespeare,
Stack Overflow.

Layout (TFF `HDF5ClientData`): a group `examples` with one group per client id, holding one
dataset per feature, all of the same length: `examples/<client_id>/<feature>`. Features used:
  EMNIST (fed_emnist[_digitsonly]_{train,test}.h5): `pixels` float32 [n, 28, 28], `label` [n];
  Shakespeare (shakespeare_{train,test}.h5): `snippets` [n] byte strings;
  Stack Overflow (stackoverflow_{train,held_out,test}.h5): `tokens` [n] space-separated words.
Other features in a group are not read. Users who have these files can load them; nothing is
downloaded, and the loaders only read.

Text becomes next-token sequences (x [n, T] float32 ids, y [n, T] int32 targets; see
`fedjax_lab.core.losses`), with fedjax's preprocessing (google/fedjax, `fedjax/datasets/
shakespeare.py` `preprocess_client` and `stackoverflow.py` `StackoverflowTokenizer`):
  Shakespeare: ids PAD 0, BOS 1, EOS 2, the vocabulary's characters 3.. (by default the 86
    symbols of TFF's Shakespeare tutorial) and one out-of-vocabulary id last (90 classes, as
    fedjax's VOCAB_SIZE). Each snippet becomes [BOS] + character ids + [EOS]; a client's
    snippets are joined into one stream s, and inputs s[:-1] and targets s[1:] are each padded
    with PAD to a multiple of T and cut into rows of T. So sequence k is s[kT : kT + T + 1]
    shifted by one: consecutive sequences share a boundary character and no target is lost
    (fedjax notes that TFF's tutorial, which cuts disjoint chunks of T + 1, loses 1 in T). A PAD
    target is `IGNORE_LABEL`; BOS and EOS targets count, as in fedjax's training loss.
  Stack Overflow: ids PAD 0, BOS 1, EOS 2, the vocabulary's words 3.., one out-of-vocabulary id
    last (10,000 + 4 classes by default). Each post (its `tokens`, split on whitespace) becomes
    ids = [BOS] + word ids + [EOS], truncated to T + 1 and padded with PAD: x = ids[:-1],
    y = ids[1:], one sequence per post. Targets PAD, BOS, EOS and out-of-vocabulary are
    `IGNORE_LABEL`, so loss and accuracy count in-vocabulary words only: the accuracy Reddi et
    al. (ICLR 2021) report, TFF research code's `accuracy_no_oov_or_eos` (PAD, EOS and OOV
    masked; BOS is never a target).
    (fedjax differs: its `accuracy_in_vocab` masks PAD and EOS targets and scores an OOV target
    as a miss, and its training loss masks PAD only.) The vocabulary is the first
    `vocabulary_size` lines of TFF's `stackoverflow.word_count` ("word count" per line, most
    frequent first), read by `read_word_counts` as fedjax's `default_vocab` reads them.
Every client with a snippet or a post has at least one sequence.

Bad input is a `DataFormatError` naming the file, the client and the feature: a file that is not
HDF5, a missing `examples` group, a missing client group or feature, features of different
lengths, an empty client, a test client not in train, a character outside the vocabulary
(fedjax maps it to its out-of-vocabulary id silently; here it is an error naming the character).
A word-count file line that is not "word count" with an integer count, or a count above the
previous line's (not most frequent first), is a `DataFormatError` naming the file and the line.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_lab.core.losses import IGNORE_LABEL
from fedjax_lab.data.federated import ClientData, FederatedDataset
from fedjax_lab.data.leaf import DataFormatError, encode_characters

TFF_SHAKESPEARE_VOCABULARY = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
                              "aeimquyAEIMQUY]!%)-159\r")
# fedjax's reserved ids; a vocabulary's entries follow them, and one out-of-vocabulary id ends it.
PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3


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
          num_classes: int, metadata: dict, label_shape: tuple = ()) -> FederatedDataset:
    """A `FederatedDataset` of train clients {id: (x, y)}; test clients must be train clients.

    Sequence targets (`label_shape` (T,)) may be `IGNORE_LABEL`; every other label must lie in
    [0, num_classes)."""
    for client_id in test:
        if client_id not in train:
            raise DataFormatError(f"{test_path}: client {client_id!r} is in the test file but "
                                  f"not in {train_path}")
    names = tuple(train)
    empty = (np.zeros((0, *feature_shape), np.float32), np.zeros((0, *label_shape), np.int32))
    test = {client_id: test.get(client_id, empty) for client_id in names}
    ignorable = IGNORE_LABEL if label_shape else 0
    for split, clients, path in (("train", train, train_path), ("test", test, test_path)):
        for client_id, (_, y) in clients.items():
            bad = y[((y < 0) & (y != ignorable)) | (y >= num_classes)]
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


def shakespeare_sequences(snippets: Sequence[str], vocabulary: str, sequence_length: int,
                          where: str) -> tuple[np.ndarray, np.ndarray]:
    """fedjax's Shakespeare preprocessing of one client: (x float32, y int32), each [n, T].

    Each snippet becomes [BOS] + ids + [EOS]; the joined stream's inputs s[:-1] and targets s[1:]
    are padded with PAD to a multiple of T and cut into rows; PAD targets are `IGNORE_LABEL`.
    With T = 3, snippets ["ABCD", "E"] give x [[BOS A B] [C D EOS] [BOS E PAD]] and
    y [[A B C] [D EOS BOS] [E EOS -1]].
    """
    pieces = []
    for i, snippet in enumerate(snippets):
        codes = encode_characters(snippet, vocabulary, f"{where}, snippet {i}") + NUM_RESERVED
        pieces.append(np.concatenate([[BOS], codes, [EOS]]))
    stream = np.concatenate(pieces).astype(np.int32)
    length = -(-(len(stream) - 1) // sequence_length) * sequence_length
    x = np.full(length, PAD, np.int32)
    y = np.full(length, IGNORE_LABEL, np.int32)
    x[:len(stream) - 1], y[:len(stream) - 1] = stream[:-1], stream[1:]
    return (x.reshape(-1, sequence_length).astype(np.float32),
            y.reshape(-1, sequence_length))


def load_shakespeare_h5(train_path: str, test_path: str, *, sequence_length: int = 80,
                        vocabulary: str = TFF_SHAKESPEARE_VOCABULARY,
                        client_ids: Sequence[str] | None = None) -> FederatedDataset:
    """Federated Shakespeare (TFF `shakespeare_{train,test}.h5`) as next-character sequences.

    x: [n, sequence_length] ids (float32, exact), y: the next ids, PAD targets `IGNORE_LABEL`;
    num_classes = len(vocabulary) + 4 (PAD, BOS, EOS, the characters, out-of-vocabulary).
    """
    def sequences(path, ids):
        return {client_id: shakespeare_sequences(
                    _decode(f["snippets"], path, client_id, "snippets"), vocabulary,
                    sequence_length, f"{path}: client {client_id!r}: feature 'snippets'")
                for client_id, f in read_h5_clients(path, ("snippets",), ids).items()}

    train, test = sequences(train_path, client_ids), sequences(test_path,
                                                               _in_file(client_ids, test_path))
    out_of_vocabulary = NUM_RESERVED + len(vocabulary)
    return _pair("shakespeare_h5", train, test, train_path, test_path, (sequence_length,),
                 out_of_vocabulary + 1,
                 {"train_path": train_path, "test_path": test_path,
                  "sequence_length": sequence_length, "vocabulary": vocabulary,
                  "special_ids": {"pad": PAD, "bos": BOS, "eos": EOS,
                                  "out_of_vocabulary": out_of_vocabulary},
                  "ignored_targets": ["pad"],
                  "source": "TensorFlow Federated Shakespeare HDF5, fedjax's preprocessing"},
                 (sequence_length,))


def read_word_counts(path: str, vocabulary_size: int) -> list[str]:
    """The words of the first `vocabulary_size` lines of a "word count" file (TFF's
    `stackoverflow.word_count`, most frequent first, as fedjax's `default_vocab` reads it).

    Blank lines are skipped; a line that is not two fields with an integer count, or whose count
    exceeds the previous line's, is a `DataFormatError` naming the file and the line number.
    """
    words, previous = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(words) == vocabulary_size:
                break
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataFormatError(f"{path}: line {number}: {line.rstrip()!r:.60} is not "
                                      "'word count' (two fields, an integer count)")
            count = int(fields[1])
            if previous is not None and count > previous:
                raise DataFormatError(f"{path}: line {number}: count {count} is above the "
                                      f"previous line's {previous}; expected the words most "
                                      "frequent first")
            words.append(fields[0])
            previous = count
    return words


def stackoverflow_sequences(posts: Sequence[str], lookup: dict[str, int], out_of_vocabulary: int,
                            sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """One sequence per post: ids = [BOS] + word ids + [EOS] truncated to T + 1 and padded with
    PAD; x = ids[:-1] (float32), y = ids[1:] with PAD, BOS, EOS and out-of-vocabulary targets
    `IGNORE_LABEL`."""
    ids = np.full((len(posts), sequence_length + 1), PAD, np.int32)
    for row, post in zip(ids, posts):
        words = [BOS] + [lookup.get(w, out_of_vocabulary) for w in post.split()] + [EOS]
        words = words[:sequence_length + 1]
        row[:len(words)] = words
    y = ids[:, 1:].copy()
    y[np.isin(y, (PAD, BOS, EOS, out_of_vocabulary))] = IGNORE_LABEL
    return ids[:, :-1].astype(np.float32), y


def load_stackoverflow_h5(train_path: str, test_path: str, vocabulary: Sequence[str], *,
                          sequence_length: int = 20,
                          client_ids: Sequence[str] | None = None) -> FederatedDataset:
    """Stack Overflow (TFF `stackoverflow_{train,test}.h5`) as next-word sequences, one per post.

    Args:
      vocabulary: the words, most frequent first (e.g. `read_word_counts` of TFF's
        `stackoverflow.word_count`, 10,000 words), without special tokens; num_classes =
        len + 4.
      sequence_length: fedjax's max_length (20 for training in Reddi et al. and fedjax).
    """
    lookup = {word: i + NUM_RESERVED for i, word in enumerate(vocabulary)}
    out_of_vocabulary = len(vocabulary) + NUM_RESERVED

    def sequences(path, ids):
        return {client_id: stackoverflow_sequences(_decode(f["tokens"], path, client_id,
                                                           "tokens"),
                                                   lookup, out_of_vocabulary, sequence_length)
                for client_id, f in read_h5_clients(path, ("tokens",), ids).items()}

    train = sequences(train_path, client_ids)
    test = sequences(test_path, _in_file(client_ids, test_path))
    return _pair("stackoverflow_h5", train, test, train_path, test_path, (sequence_length,),
                 out_of_vocabulary + 1,
                 {"train_path": train_path, "test_path": test_path,
                  "sequence_length": sequence_length, "vocabulary_size": len(vocabulary),
                  "special_ids": {"pad": PAD, "bos": BOS, "eos": EOS,
                                  "out_of_vocabulary": out_of_vocabulary},
                  "ignored_targets": ["pad", "bos", "eos", "out_of_vocabulary"],
                  "source": "TensorFlow Federated Stack Overflow HDF5, fedjax's tokenizer"},
                 (sequence_length,))
