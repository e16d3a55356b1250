"""Loader for LEAF's JSON format: FEMNIST, Shakespeare and synthetic (ALGORITHMS.md 0.3).

Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv 1812.01097;
github.com/TalwalkarLab/leaf. Each `.json` file holds `users` (ids), `num_samples` (aligned with
`users`), `user_data` (id -> {"x": [...], "y": [...]}) and optionally `hierarchies` (aligned with
`users`; Shakespeare's play per role). Train and test are folders (`data/train`, `data/test`) of
one or more files each; all files of a folder are merged (FEMNIST writes at most 100 writers per
file), and train and test files need not pair up by name.

Features: FEMNIST x = 784 floats (28 x 28 row-major, background 1.0), y in [0, 62); synthetic
x = d floats, y an integer class. Shakespeare's JSON pairs x = 80 characters with y = the next
one; it becomes a next-character sequence (see `fedjax_lab.core.losses`): inputs x as 80 indices
in LEAF's 80-symbol vocabulary (float32, exact below 2^24; an embedding model casts them back to
integers) and targets x[1:] + y (80 int32 indices), so every position predicts its next
character, as LEAF's and FedAvg's character LSTM train (McMahan et al., AISTATS 2017). No target
is ignored.

Policy: a test user must be a train user (LEAF's "-t sample" split); a train user without test
examples gets an empty test split and is listed in `metadata["users_without_test"]`.

Bad input is a `DataFormatError` (a ValueError) naming the file, the user and the field, raised
before anything is returned: malformed JSON, a missing or ill-typed field, `num_samples` not
matching `user_data`, x and y of different lengths, an empty user, a user in two files, a test
user not in train, a character outside the vocabulary, a wrongly shaped example. The loader only
reads; it writes nothing.

Pitfall avoided: LEAF's own `letter_to_vec` maps an unknown character to -1, which silently
indexes the last embedding row; here it is an error naming the character.
"""

from __future__ import annotations

import json
import os

import numpy as np

from fedjax_lab.data.federated import ClientData, FederatedDataset

SHAKESPEARE_VOCABULARY = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                          "abcdefghijklmnopqrstuvwxyz}")
SHAKESPEARE_SEQUENCE_LENGTH = 80
LEAF_DATASETS = {"femnist": 62, "shakespeare": len(SHAKESPEARE_VOCABULARY), "synthetic": None}


class DataFormatError(ValueError):
    """A data file that does not have the documented layout; the message names file and field."""


def encode_characters(text: str, vocabulary: str, where: str) -> np.ndarray:
    """Indices of the characters of `text` in `vocabulary`, or an error naming `where`."""
    lookup = {c: i for i, c in enumerate(vocabulary)}
    try:
        return np.array([lookup[c] for c in text], np.int32)
    except KeyError as missing:
        position = text.index(missing.args[0])
        raise DataFormatError(f"{where}: character {missing.args[0]!r} at position {position} "
                              "is not in the vocabulary") from None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: malformed JSON at line {error.lineno} column "
                              f"{error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error.reason})") from None
    if not isinstance(content, dict):
        raise DataFormatError(f"{path}: top level is a JSON {type(content).__name__}; expected "
                              "an object with users, num_samples and user_data")
    for field, kind in (("users", list), ("num_samples", list), ("user_data", dict)):
        if not isinstance(content.get(field), kind):
            found = "missing" if field not in content else type(content[field]).__name__
            raise DataFormatError(f"{path}: field {field!r} is {found}; expected a JSON "
                                  f"{'array' if kind is list else 'object'}")
    return content


def _examples(path: str, user: str, data, dataset: str, vocabulary: str):
    """One user's (x, y) arrays, converted and checked."""
    where = f"{path}: user {user!r}"
    if not isinstance(data, dict) or not isinstance(data.get("x"), list) \
            or not isinstance(data.get("y"), list):
        raise DataFormatError(f"{where}: field 'user_data' entry must be an object with lists "
                              "'x' and 'y'")
    xs, ys = data["x"], data["y"]
    if len(xs) != len(ys):
        raise DataFormatError(f"{where}: fields 'x' and 'y' have {len(xs)} and {len(ys)} "
                              "entries; expected the same length")
    if not xs:
        raise DataFormatError(f"{where}: no examples (empty client)")
    if dataset == "shakespeare":
        for i, (x, y) in enumerate(zip(xs, ys)):
            if not isinstance(x, str) or len(x) != SHAKESPEARE_SEQUENCE_LENGTH:
                raise DataFormatError(f"{where}: field 'x' example {i} is {x!r:.40}; expected "
                                      f"a string of {SHAKESPEARE_SEQUENCE_LENGTH} characters")
            if not isinstance(y, str) or len(y) != 1:
                raise DataFormatError(f"{where}: field 'y' example {i} is {y!r}; expected one "
                                      "character")
        x = np.stack([encode_characters(x, vocabulary, f"{where}: field 'x' example {i}")
                      for i, x in enumerate(xs)])
        y = np.concatenate([encode_characters(y, vocabulary, f"{where}: field 'y' example {i}")
                            for i, y in enumerate(ys)])
        return x, np.concatenate([x[:, 1:], y[:, None]], axis=1)
    try:
        x = np.asarray(xs, np.float32)
    except (ValueError, TypeError):
        raise DataFormatError(f"{where}: field 'x' is not a list of equally long lists of "
                              "numbers") from None
    y = np.asarray(ys)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(f"{where}: field 'y' must be a list of integers")
    if dataset == "femnist" and x.shape[1:] != (784,):
        raise DataFormatError(f"{where}: field 'x' examples have shape {x.shape[1:]}; expected "
                              "(784,) (a flattened 28 x 28 image)")
    if x.ndim != 2:
        raise DataFormatError(f"{where}: field 'x' examples have shape {x.shape[1:]}; expected "
                              "flat lists of numbers")
    return x, y


def read_leaf_folder(folder: str, dataset: str, vocabulary: str = SHAKESPEARE_VOCABULARY):
    """Reads and merges every `.json` file of `folder` (in name order).

    Returns:
      (clients, files, hierarchies): a `ClientData` with the users in file order, the file
      each user came from, and each user's hierarchy entry where the files have one.
    """
    if dataset not in LEAF_DATASETS:
        raise ValueError(f"dataset={dataset!r}; expected one of {tuple(LEAF_DATASETS)}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"LEAF folder {folder!r} does not exist")
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json"))
    if not paths:
        raise FileNotFoundError(f"LEAF folder {folder!r} holds no .json file")
    xs, ys, names, files, hierarchies = [], [], [], {}, {}
    for path in paths:
        content = _read_json(path)
        users, counts, user_data = (content["users"], content["num_samples"],
                                    content["user_data"])
        if len(users) != len(counts):
            raise DataFormatError(f"{path}: field 'num_samples' has {len(counts)} entries and "
                                  f"'users' has {len(users)}; expected one count per user")
        extra = sorted(set(map(str, user_data)) - set(map(str, users)))
        if extra:
            raise DataFormatError(f"{path}: user {extra[0]!r} is in field 'user_data' but not in "
                                  "'users'")
        levels = content.get("hierarchies")
        if levels is not None and (not isinstance(levels, list) or len(levels) != len(users)):
            raise DataFormatError(f"{path}: field 'hierarchies' must be a list with one entry "
                                  "per user")
        for i, (user, count) in enumerate(zip(users, counts)):
            if not isinstance(user, str):
                raise DataFormatError(f"{path}: field 'users' entry {i} is {user!r}; expected "
                                      "a string")
            if user in files:
                raise DataFormatError(f"{path}: user {user!r} also appears in {files[user]}; "
                                      "expected each user in one file")
            if user not in user_data:
                raise DataFormatError(f"{path}: user {user!r} is in field 'users' but has no "
                                      "'user_data' entry")
            x, y = _examples(path, user, user_data[user], dataset, vocabulary)
            if not isinstance(count, int) or count != len(y):
                raise DataFormatError(f"{path}: user {user!r}: field 'num_samples' says "
                                      f"{count!r} but 'user_data' holds {len(y)} examples")
            xs.append(x)
            ys.append(y)
            names.append(user)
            files[user] = path
            if levels is not None:
                hierarchies[user] = levels[i]
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        first = next(n for n, x in zip(names, xs) if x.shape[1:] != xs[0].shape[1:])
        raise DataFormatError(f"{files[first]}: user {first!r}: field 'x' examples have shape "
                              f"{shapes - {xs[0].shape[1:]}}; expected {xs[0].shape[1:]} as "
                              f"user {names[0]!r}")
    return ClientData(tuple(xs), tuple(ys), tuple(names)), files, hierarchies


def load_leaf(train_dir: str, test_dir: str, dataset: str, *, num_classes: int | None = None,
              vocabulary: str = SHAKESPEARE_VOCABULARY) -> FederatedDataset:
    """A LEAF data set from its train and test folders.

    Args:
      train_dir, test_dir: folders of LEAF `.json` files (e.g. `data/train`, `data/test`).
      dataset: "femnist", "shakespeare" or "synthetic".
      num_classes: number of classes; by default 62 (FEMNIST), 80 (Shakespeare) or the largest
        synthetic label + 1.
      vocabulary: Shakespeare's characters in index order (LEAF's 80 symbols by default).

    Returns:
      A `FederatedDataset` named f"leaf_{dataset}" with the train users in file order;
      Shakespeare's examples are sequences (x [n, 80], y [n, 80]: each position's next
      character).
    """
    train, train_files, hierarchies = read_leaf_folder(train_dir, dataset, vocabulary)
    test, test_files, test_hierarchies = read_leaf_folder(test_dir, dataset, vocabulary)
    row = {name: i for i, name in enumerate(train.names)}
    for user in test.names:
        if user not in row:
            raise DataFormatError(f"{test_files[user]}: user {user!r} is in the test files but "
                                  f"in no train file of {train_dir!r}")
    test_row = {name: i for i, name in enumerate(test.names)}
    empty_x = np.zeros((0, *train.feature_shape), np.float32)
    empty_y = np.zeros((0, *train.label_shape), np.int32)
    test = ClientData(
        tuple(test.x[test_row[u]] if u in test_row else empty_x for u in train.names),
        tuple(test.y[test_row[u]] if u in test_row else empty_y for u in train.names),
        train.names)
    if dataset == "shakespeare":
        num_classes = num_classes or len(vocabulary)
    else:
        largest = max(int(y.max()) for y in train.y + test.y if y.size)
        num_classes = num_classes or LEAF_DATASETS[dataset] or largest + 1
    for data, files in ((train, train_files), (test, test_files)):
        for user, y in zip(data.names, data.y):
            bad = y[(y < 0) | (y >= num_classes)]
            if bad.size:
                raise DataFormatError(f"{files[user]}: user {user!r}: field 'y' has label "
                                      f"{int(bad[0])}; expected labels in [0, {num_classes})")
    metadata = {"dataset": dataset, "train_dir": train_dir, "test_dir": test_dir,
                "hierarchies": {**test_hierarchies, **hierarchies},
                "users_without_test": [u for u in train.names if u not in test_row],
                "source": "LEAF JSON (Caldas et al., arXiv 1812.01097)"}
    return FederatedDataset(f"leaf_{dataset}", train, test, num_classes, metadata)
