"""Text file -> vocabulary -> context windows -> train/val/test splits.

One item per line (a name, a word). Each item ``w`` becomes ``len(w) + 1`` examples:
the context is the previous ``block_size`` token ids (left-padded with the boundary
token 0) and the target is the next id, the boundary token once more at the end:

    ...  -> e,  ..e -> m,  .em -> m,  emm -> a,  mma -> .      (block_size 3, "emma")

Index 0 is reserved for the boundary, so it can never collide with a real character:
a dataset that contains ``.`` works, and the boundary is *shown* as ``.`` only when
``.`` is not itself in the data.

The split is the lecture's: ``random.Random(seed).shuffle(items)`` (the same sequence as
``random.seed(42); random.shuffle(words)``), then the first 80% for training, the next
10% for validation, the last 10% for test. Examples are stored in the smallest integer
dtype that holds the vocabulary (uint8 for up to 256 tokens), built with numpy in a few
vectorised passes, so a 1,000,000-line file loads in seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from plumb.errors import PlumbError

# Symbols to show the boundary token with, in order of preference; the first one that
# is not a character of the data is used.
_BOUNDARY_SYMBOLS = (".", "·", "¶", "␄", "⟂")
DEFAULT_MAX_ITEM_CHARS = 10_000


def names_path() -> Path:
    """Path of the bundled names dataset (32,033 names, MIT, see datasets/README.md)."""
    return Path(str(resources.files("plumb") / "datasets" / "names.txt"))


@dataclass(frozen=True)
class Vocab:
    """Characters of the data; id 0 is the boundary, ids 1.. are ``chars`` in sorted order."""

    chars: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @property
    def boundary(self) -> str:
        """How the boundary token is shown: ``.`` unless ``.`` is a real character."""
        taken = set(self.chars)
        for symbol in _BOUNDARY_SYMBOLS:
            if symbol not in taken:
                return symbol
        return "<|>"  # every single-character symbol above occurs in the data

    @property
    def stoi(self) -> dict[str, int]:
        return {ch: i + 1 for i, ch in enumerate(self.chars)}

    @property
    def itos(self) -> dict[int, str]:
        return {0: self.boundary, **{i + 1: ch for i, ch in enumerate(self.chars)}}

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:
            raise PlumbError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        itos = self.itos
        return "".join(itos[int(i)] for i in ids)

    def index_dtype(self) -> torch.dtype:
        """Smallest integer dtype that holds every token id."""
        if self.size <= 256:
            return torch.uint8
        if self.size <= 2**15:
            return torch.int16
        return torch.int32


@dataclass
class Split:
    """Examples of one split: ``X`` (N, block_size) contexts and ``Y`` (N,) next tokens."""

    X: torch.Tensor
    Y: torch.Tensor
    items: list[str]

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class Dataset:
    vocab: Vocab
    block_size: int
    splits: dict[str, Split]
    source: str

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def counts(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def read_items(path: str | Path, max_item_chars: int = DEFAULT_MAX_ITEM_CHARS) -> list[str]:
    """Read a UTF-8 text file, one item per line; strip each line and drop blank ones."""
    path = Path(path)
    if not path.exists():
        raise PlumbError(f"data file {path} does not exist: pass --data PATH to a UTF-8 text file")
    if path.is_dir():
        raise PlumbError(f"data path {path} is a directory: pass a text file, one item per line")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PlumbError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PlumbError(
            f"{path} is not valid UTF-8 (line {line}, byte {e.start}): "
            "re-save it as UTF-8 text, one item per line"
        ) from None
    # splitlines() as in the lecture (`open(...).read().splitlines()`).
    items = [w for w in (line.strip() for line in text.splitlines()) if w]
    if not items:
        raise PlumbError(f"{path} has no items (empty or blank lines only): one item per line")
    longest = max(range(len(items)), key=lambda i: len(items[i]))
    if len(items[longest]) > max_item_chars:
        raise PlumbError(
            f"{path}: an item of {len(items[longest]):,} characters ('{items[longest][:20]}...') "
            f"is longer than the limit of {max_item_chars:,}; plumb models short items "
            "(names, words), one per line: split the file into lines"
        )
    return items


def split_items(
    items: list[str], seed: int = 42, fractions: tuple[float, float] = (0.8, 0.9)
) -> dict[str, list[str]]:
    """Shuffle with ``random.Random(seed)`` and cut at ``int(f * n)`` (the lecture's split)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n1, n2 = int(fractions[0] * len(items)), int(fractions[1] * len(items))
    return {"train": items[:n1], "val": items[n1:n2], "test": items[n2:]}


def build_vocab(items: list[str]) -> Vocab:
    return Vocab(tuple(sorted(set("".join(items)))))


def context_windows(items: list[str], vocab: Vocab, block_size: int) -> tuple[np.ndarray, ...]:
    """All (context, next-token) pairs of ``items``, vectorised.

    Each item is laid out as ``[0]*block_size + ids + [0]`` in one flat stream; the
    example at position ``p`` of the stream has context ``stream[p : p+block_size]`` and
    target ``stream[p+block_size]``.
    """
    dtype = vocab.index_dtype()
    np_dtype = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}[dtype]
    if not items:
        return np.zeros((0, block_size), np_dtype), np.zeros((0,), np_dtype)
    lengths = np.fromiter((len(w) for w in items), dtype=np.int64, count=len(items))
    codes = np.frombuffer("".join(items).encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer("".join(vocab.chars).encode("utf-32-le"), dtype=np.uint32)
    ids = (np.searchsorted(table, codes) + 1).astype(np_dtype)  # table is sorted by code point
    # Flat stream: block_size zeros, the item's ids, one boundary zero, per item.
    span = lengths + block_size + 1
    starts = np.concatenate(([0], np.cumsum(span)[:-1]))
    stream = np.zeros(int(span.sum()), dtype=np_dtype)
    item_of_char = np.repeat(np.arange(len(items)), lengths)
    offset_in_item = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stream[starts[item_of_char] + block_size + offset_in_item] = ids
    # Example positions: for item k, starts[k] + 0 .. starts[k] + len_k.
    n_examples = lengths + 1
    pos = np.repeat(starts, n_examples) + (
        np.arange(int(n_examples.sum())) - np.repeat(np.cumsum(n_examples) - n_examples, n_examples)
    )
    X = stream[pos[:, None] + np.arange(block_size)]
    Y = stream[pos + block_size]
    return X, Y


def load_dataset(
    path: str | Path | None = None,
    block_size: int = 3,
    seed: int = 42,
    max_item_chars: int = DEFAULT_MAX_ITEM_CHARS,
) -> Dataset:
    """Load ``path`` (default: the bundled names) into a :class:`Dataset` of three splits."""
    if block_size <= 0:
        raise PlumbError(f"block_size must be a positive integer, got {block_size}")
    path = names_path() if path is None else Path(path)
    items = read_items(path, max_item_chars)
    if len(items) < 3:
        raise PlumbError(
            f"{path} has {len(items)} item(s); the 80/10/10 split needs at least 3 "
            "(and thousands to learn anything): add more lines"
        )
    vocab = build_vocab(items)
    parts = split_items(items, seed)
    if not parts["train"]:
        raise PlumbError(f"{path}: the training split is empty; add more lines")
    splits = {}
    for name, part in parts.items():
        X, Y = context_windows(part, vocab, block_size)
        splits[name] = Split(torch.from_numpy(X), torch.from_numpy(Y), part)
    return Dataset(vocab, block_size, splits, str(path))
