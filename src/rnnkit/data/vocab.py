"""A vocabulary of strings with a padding id (0) and an unknown-item id (1)."""

from collections import Counter
from collections.abc import Iterable

PAD = 0
UNK = 1


class Vocab:
    """Maps items (words, characters) to ids; ids 0 and 1 are padding and the unknown item."""

    def __init__(self, items: Iterable[str]) -> None:
        self.itos = ["<pad>", "<unk>"] + [s for s in items if s not in ("<pad>", "<unk>")]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]], min_count: int = 1) -> "Vocab":
        """Items seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(item for seq in sequences for item in seq)
        ranked = sorted(counts, key=lambda s: (-counts[s], s))
        return cls(s for s in ranked if counts[s] >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, seq: Iterable[str]) -> list[int]:
        return [self.stoi.get(s, UNK) for s in seq]
