"""Task heads on any rnnkit layer: a sequence classifier, a regressor, a tagger and a char RNN.

Every model is ``encoder -> readout -> linear``. The encoder is an ``rnnkit.RNN``, ``LSTM`` or
``GRU`` (``cell``) on any engine (``backend``), always ``batch_first``. Variable-length batches come
as a padded ``(B, T, I)`` tensor with ``lengths`` ``(B,)``; the models pack them, so padding never
reaches the recurrence and ``h_n`` is each sequence's own last step.

The readouts are seed 003's three ways of turning a whole sequence into one vector
(see :func:`readout`): ``last``, ``hn`` and ``mean``.
"""

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.layers import GRU, LSTM, RNN

CELLS = ("rnn", "lstm", "gru")
READOUTS = ("last", "hn", "mean")
KINDS = ("classifier", "regressor", "tagger", "charrnn")


def make_encoder(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    backend: str = "auto",
) -> RNN | LSTM | GRU:
    """A batch-first recurrent layer stack of type ``cell`` ("rnn", "lstm" or "gru")."""
    layers = {"rnn": RNN, "lstm": LSTM, "gru": GRU}
    if cell not in layers:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}; got {cell!r}")
    return layers[cell](
        input_size,
        hidden_size,
        num_layers,
        batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0,
        bidirectional=bidirectional,
        backend=backend,
    )


def readout_size(kind: str, hidden_size: int, num_layers: int, num_directions: int) -> int:
    """Features of the vector :func:`readout` returns."""
    if kind == "last":
        return num_directions * hidden_size
    if kind == "hn":
        return num_layers * num_directions * hidden_size
    if kind == "mean":
        return hidden_size
    raise ValueError(f"readout must be one of {', '.join(READOUTS)}; got {kind!r}")


def readout(
    kind: str, output: Tensor, h_n: Tensor, lengths: Tensor | None, num_directions: int
) -> Tensor:
    """One vector per sequence from a batch-first layer's ``output`` and ``h_n``.

    - ``last``: ``output`` at each sequence's own last step ``lengths[b] - 1`` (the final step
      when ``lengths`` is None); with two directions that is the forward state after the whole
      sequence beside the backward state after only its last step, exactly seed 003's
      ``output[:, -1, :]``. ``(B, D * H)``.
    - ``hn``: ``h_n`` of every layer and direction side by side, rows in torch's order
      ``layer * D + direction``: ``torch.cat([h_n[i] for i in range(L * D)], -1)``.
      ``(B, L * D * H)``.
    - ``mean``: ``last`` with the two directions averaged instead of concatenated. ``(B, H)``.
    """
    B = output.shape[0]
    if kind == "hn":
        return h_n.transpose(0, 1).reshape(B, -1)  # (B, L * D * H)
    if kind not in ("last", "mean"):
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}; got {kind!r}")
    if lengths is None:
        at_last = output[:, -1]  # (B, D * H)
    else:
        index = (lengths.to(output.device) - 1).clamp(min=0)
        at_last = output[torch.arange(B, device=output.device), index]  # (B, D * H)
    if kind == "last":
        return at_last
    return at_last.view(B, num_directions, -1).mean(dim=1)  # (B, H)


def _run_encoder(encoder: nn.Module, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(output (B, T, D * H), h_n (L * D, B, H))``; padded steps of ``output`` are zeros."""
    if lengths is None:
        output, hidden = encoder(x)
    else:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, hidden = encoder(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
    h_n = hidden[0] if isinstance(hidden, tuple) else hidden
    return output, h_n


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved beside its weights."""

    kind: str
    input_size: int
    output_size: int
    cell: str = "lstm"
    hidden_size: int = 64
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    readout: str = "last"
    backend: str = "auto"
    embedding_dim: int = 0
    horizon: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class _Encoded(nn.Module):
    def __init__(self, config: ModelConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_directions = 2 if config.bidirectional else 1
        self.encoder = make_encoder(
            config.cell,
            input_size,
            config.hidden_size,
            config.num_layers,
            config.bidirectional,
            config.dropout,
            config.backend,
        )
        self.drop = nn.Dropout(config.dropout)

    def encode(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        output, h_n = _run_encoder(self.encoder, x, lengths)
        return self.drop(readout(self.config.readout, output, h_n, lengths, self.num_directions))

    def head_size(self) -> int:
        c = self.config
        return readout_size(c.readout, c.hidden_size, c.num_layers, self.num_directions)


class SequenceClassifier(_Encoded):
    """``(B, T, I)`` sequences to ``(B, num_classes)`` logits through a readout and a linear layer.

    Seed 001's ``BiLSTM`` and seed 003's sequential-MNIST model are this with ``readout="last"``
    and ``readout="hn"``.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        readout: str = "last",
        backend: str = "auto",
    ) -> None:
        config = ModelConfig(
            "classifier",
            input_size,
            num_classes,
            cell,
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            readout,
            backend,
        )
        super().__init__(config, input_size)
        self.fc = nn.Linear(self.head_size(), num_classes)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.fc(self.encode(x, lengths))  # (B, C)


class SequenceRegressor(_Encoded):
    """``(B, T, I)`` history to the next ``horizon`` values ``(B, horizon)``: seed 000's
    ``LSTMModel`` with ``horizon=1``, seed 003's 24 h -> 2 h load forecaster with ``horizon=4``."""

    def __init__(
        self,
        input_size: int,
        horizon: int = 1,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        readout: str = "last",
        backend: str = "auto",
    ) -> None:
        if horizon < 1:
            raise ValueError(f"SequenceRegressor: horizon must be at least 1; got {horizon}")
        config = ModelConfig(
            "regressor",
            input_size,
            horizon,
            cell,
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            readout,
            backend,
            horizon=horizon,
        )
        super().__init__(config, input_size)
        self.fc = nn.Linear(self.head_size(), horizon)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.fc(self.encode(x, lengths))  # (B, horizon)


class Tagger(nn.Module):
    """Seed 002's ``LSTMTagger``: token ids ``(B, T)`` -> embedding -> recurrent layer -> one
    linear layer per step -> ``(B, T, num_tags)`` logits. Id 0 is padding, id 1 the unknown word."""

    def __init__(
        self,
        vocab_size: int,
        num_tags: int,
        embedding_dim: int = 64,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.config = ModelConfig(
            "tagger",
            vocab_size,
            num_tags,
            cell,
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            "last",
            backend,
            embedding_dim,
        )
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.encoder = make_encoder(
            cell, embedding_dim, hidden_size, num_layers, bidirectional, dropout, backend
        )
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear((2 if bidirectional else 1) * hidden_size, num_tags)

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = self.drop(self.embedding(tokens))  # (B, T, E)
        output, _ = _run_encoder(self.encoder, x, lengths)  # (B, T, D * H)
        return self.fc(self.drop(output))  # (B, T, num_tags)


class CharRNN(_Encoded):
    """Seed 002's character-level classifier: character ids ``(B, T)`` -> embedding ->
    recurrent layer -> readout -> ``(B, num_classes)`` logits. Id 0 is padding, id 1 unknown."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int = 32,
        cell: str = "gru",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        readout: str = "last",
        backend: str = "auto",
    ) -> None:
        config = ModelConfig(
            "charrnn",
            vocab_size,
            num_classes,
            cell,
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            readout,
            backend,
            embedding_dim,
        )
        super().__init__(config, embedding_dim)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.fc = nn.Linear(self.head_size(), num_classes)

    def forward(self, chars: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.fc(self.encode(self.embedding(chars), lengths))  # (B, C)


def build_model(config: ModelConfig | dict) -> nn.Module:
    """The model a :class:`ModelConfig` (or its dict) describes, freshly initialised."""
    c = config if isinstance(config, ModelConfig) else ModelConfig(**config)
    common = dict(
        cell=c.cell,
        hidden_size=c.hidden_size,
        num_layers=c.num_layers,
        bidirectional=c.bidirectional,
        dropout=c.dropout,
        backend=c.backend,
    )
    if c.kind == "classifier":
        return SequenceClassifier(c.input_size, c.output_size, readout=c.readout, **common)
    if c.kind == "regressor":
        return SequenceRegressor(c.input_size, c.horizon, readout=c.readout, **common)
    if c.kind == "tagger":
        return Tagger(c.input_size, c.output_size, c.embedding_dim, **common)
    if c.kind == "charrnn":
        return CharRNN(c.input_size, c.output_size, c.embedding_dim, readout=c.readout, **common)
    raise ValueError(f"model kind must be one of {', '.join(KINDS)}; got {c.kind!r}")
