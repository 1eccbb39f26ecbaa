import random

import pytest
import torch

from plumb.data import Vocab, context_windows, load_dataset, names_path, read_items
from plumb.errors import PlumbError


def lecture_build(words, stoi, block_size):
    """The notebook's build_dataset, verbatim in behaviour."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = [*context[1:], ix]
    return torch.tensor(X), torch.tensor(Y)


def test_names_split_sizes_match_lecture(names):
    assert names.counts() == {"train": 182625, "val": 22655, "test": 22866}
    assert names.vocab.size == 27 and names.vocab.boundary == "."
    assert names.train.X.dtype == torch.uint8 and names.train.X.shape == (182625, 3)


def test_examples_equal_the_notebooks_build_dataset(names):
    words = names_path().read_text().splitlines()
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    for split, part in (("train", words[:n1]), ("val", words[n1:n2]), ("test", words[n2:])):
        X, Y = lecture_build(part, stoi, 3)
        assert torch.equal(names.splits[split].X.long(), X)
        assert torch.equal(names.splits[split].Y.long(), Y)


@pytest.mark.parametrize("block_size", [1, 2, 5, 8])
def test_context_windows_any_block_size(block_size):
    items = ["ab", "c", "abca"]
    vocab = Vocab(("a", "b", "c"))
    X, Y = context_windows(items, vocab, block_size)
    Xr, Yr = lecture_build(items, {**vocab.stoi, ".": 0}, block_size)
    assert torch.equal(torch.from_numpy(X).long(), Xr) and torch.equal(
        torch.from_numpy(Y).long(), Yr
    )


def test_dot_in_data_does_not_collide_with_boundary(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("a.b\n.x.\n" * 10 + "dr. who\n")
    data = load_dataset(p)
    assert "." in data.vocab.chars
    assert data.vocab.stoi["."] != 0
    assert data.vocab.boundary != "."
    # the boundary id 0 only appears as padding/terminator, never for a real "."
    _, Y = context_windows(["a.b"], data.vocab, 3)
    assert Y.tolist() == [data.vocab.stoi[c] for c in "a.b"] + [0]


def test_unicode_and_strip(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("  zoë \n\n\t\nżaneta\nöz\n" * 5, encoding="utf-8")
    data = load_dataset(p)
    assert set(data.vocab.chars) == set("zoëżanetö")
    assert all(w == w.strip() and w for s in data.splits.values() for w in s.items)


def test_large_vocab_uses_wider_dtype(tmp_path):
    p = tmp_path / "wide.txt"
    p.write_text("\n".join(chr(0x4E00 + i) * 2 for i in range(400)), encoding="utf-8")
    data = load_dataset(p)
    assert data.vocab.size > 256 and data.train.X.dtype == torch.int16
    assert int(data.train.Y.max()) < data.vocab.size


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "no items"),
        (b"\n  \n\t\n", "no items"),
        (b"abc\nde\xff\xfeg\n", "not valid UTF-8 \\(line 2"),
        (b"onlyone\n", "at least 3"),
        (b"ab\n" + b"x" * 1_000_000 + b"\ncd\n", "longer than the limit"),
    ],
)
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(PlumbError, match=match):
        load_dataset(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PlumbError, match="does not exist"):
        read_items(tmp_path / "nope.txt")
    with pytest.raises(PlumbError, match="is a directory"):
        read_items(tmp_path)
    with pytest.raises(PlumbError, match="block_size"):
        load_dataset(block_size=0)


def test_vocab_roundtrip():
    v = Vocab(tuple("abc"))
    assert v.decode(v.encode("cab")) == "cab"
    with pytest.raises(PlumbError):
        v.encode("z")
