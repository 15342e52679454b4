"""Task heads on any rnnkit layer: a sequence classifier, a regressor, a tagger and a char RNN.

Every model is ``encoder -> readout -> linear``. The encoder is an ``rnnkit.RNN``, ``LSTM`` or
``GRU`` (``cell``) on any engine (``backend``), always ``batch_first``. Variable-length batches come
as a padded ``(B, T, I)`` tensor with ``lengths`` ``(B,)``; the models pack them, so padding never
reaches the recurrence and ``h_n`` is each sequence's own last step.

The readouts are seed 003's three ways of turning a whole sequence into one vector
(see :func:`readout`): ``last``, ``hn`` and ``mean``.
"""

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.validation import RNNInputError, format_shape

CELLS = ("rnn", "lstm", "gru")
READOUTS = ("last", "hn", "mean")
KINDS = ("classifier", "regressor", "tagger", "charrnn")


def check_size(owner: str, name: str, value: object) -> None:
    """``value`` is an int of at least 1 (TypeError for another type, ValueError below 1)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be at least 1; got {value}")


def check_dropout(owner: str, dropout: object) -> None:
    """``dropout`` is a probability in [0, 1], as torch.nn.Dropout takes it."""
    if (
        not isinstance(dropout, numbers.Real)
        or isinstance(dropout, bool)
        or not 0 <= dropout <= 1  # NaN fails this too
    ):
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1]; got {dropout!r}")


def check_lengths(owner: str, lengths: object, x: Tensor) -> Tensor | None:
    """``lengths`` of a padded batch ``x`` (``(B, T, ...)``) as a 1-D int64 tensor on the CPU or
    ``x``'s device, each in ``1..T``; a list or tuple of ints is converted, like
    ``pack_padded_sequence`` does."""
    if lengths is None:
        return None
    B, T = x.shape[0], x.shape[1]
    if isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        bad = [v for v in lengths if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
        if bad:
            raise RNNInputError(
                f"{owner}: lengths must be whole numbers of steps; got {bad[0]!r} in {lengths!r}"
            )
        lengths = torch.tensor([int(v) for v in lengths], dtype=torch.long)
    if not isinstance(lengths, Tensor):
        raise RNNInputError(
            f"{owner}: lengths must be a 1-D tensor (or list) of ints, one per sequence; "
            f"got {type(lengths).__name__}"
        )
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise RNNInputError(
            f"{owner}: lengths must be an integer tensor (steps per sequence); got dtype "
            f"{lengths.dtype}"
        )
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise RNNInputError(
            f"{owner}: lengths must hold one length per sequence, shape ({B},) for a batch of {B}; "
            f"got shape {format_shape(lengths)}"
        )
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise RNNInputError(
            f"{owner}: lengths is on {lengths.device} but the input is on {x.device}; keep lengths "
            "on the CPU or on the input's device"
        )
    if B:
        low, high = (int(v) for v in torch.aminmax(lengths))
        if low < 1 or high > T:
            bad = low if low < 1 else high
            raise RNNInputError(
                f"{owner}: every length must be between 1 and the padded length T={T}; "
                f"got {bad} (lengths {_preview(lengths)})"
            )
    return lengths.long()


def check_tokens(owner: str, tokens: object, vocab_size: int) -> Tensor:
    """``tokens`` is a ``(B, T)`` integer tensor of ids in ``0..vocab_size - 1``."""
    if not isinstance(tokens, Tensor):
        raise RNNInputError(
            f"{owner}: the input must be a (B, T) tensor of token ids; got {type(tokens).__name__}"
        )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise RNNInputError(
            f"{owner}: the input must hold integer token ids (torch.long); got dtype {tokens.dtype}"
        )
    if tokens.dim() != 2:
        raise RNNInputError(
            f"{owner}: the input must be a padded batch of token ids (B, T); "
            f"got shape {format_shape(tokens)}"
        )
    if tokens.numel():
        low, high = (int(v) for v in torch.aminmax(tokens))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise RNNInputError(
                f"{owner}: token id {bad} is outside the vocabulary of vocab_size={vocab_size} "
                f"(ids 0..{vocab_size - 1})"
            )
    return tokens


def _check_features(owner: str, x: object) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        what = format_shape(x) if isinstance(x, Tensor) else type(x).__name__
        raise RNNInputError(
            f"{owner}: the input must be a padded batch of sequences (B, T, input_size); got {what}"
        )


def _preview(t: Tensor) -> str:
    values = t.flatten()[:8].tolist()
    return str(values)[:-1] + (", ...]" if t.numel() > 8 else "]")


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

    Example:
        >>> import torch, rnnkit
        >>> from rnnkit.models import readout
        >>> lstm = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        >>> output, (h_n, _) = lstm(torch.randn(5, 7, 3))
        >>> [tuple(readout(k, output, h_n, None, 2).shape) for k in ("last", "hn", "mean")]
        [(5, 8), (5, 16), (5, 4)]
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
    """Everything needed to build a model, flat; every model takes one (``Model(config)``) and
    it is saved beside the weights. ``kind`` names the model (:data:`KINDS`); ``input_size`` is
    the features per step, or the vocabulary size of the models that read ids; ``output_size``
    the classes, tags or forecast steps."""

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
    # tagger and charrnn: the token embedding
    embedding_dim: int = 0
    # tagger: a character encoder of each word's spelling when char_vocab_size > 0
    char_vocab_size: int = 0
    char_embedding_dim: int = 0
    char_hidden_size: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# The name of each model's input_size and output_size in its errors.
_SIZE_NAMES = {
    "classifier": ("input_size", "num_classes"),
    "regressor": ("input_size", "horizon"),
    "tagger": ("vocab_size", "num_tags"),
    "charrnn": ("vocab_size", "num_classes"),
}


def _check_config(owner: str, c: object, kind: str) -> ModelConfig:
    if not isinstance(c, ModelConfig):
        raise TypeError(f"{owner}: expected a ModelConfig; got {type(c).__name__}")
    if c.kind != kind:
        raise ValueError(f"{owner}: expected a ModelConfig of kind {kind!r}; got {c.kind!r}")
    input_name, output_name = _SIZE_NAMES[kind]
    check_size(owner, input_name, c.input_size)
    check_size(owner, output_name, c.output_size)
    check_size(owner, "hidden_size", c.hidden_size)
    check_size(owner, "num_layers", c.num_layers)
    check_dropout(owner, c.dropout)
    if c.kind in ("tagger", "charrnn"):
        check_size(owner, "embedding_dim", c.embedding_dim)
    if c.kind == "tagger" and c.char_vocab_size:
        check_size(owner, "char_vocab_size", c.char_vocab_size)
        check_size(owner, "char_embedding_dim", c.char_embedding_dim)
        check_size(owner, "char_hidden_size", c.char_hidden_size)
    return c


class _Encoded(nn.Module):
    """``encoder -> readout -> dropout -> linear`` over ``input_size`` features per step."""

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
        head = readout_size(
            config.readout, config.hidden_size, config.num_layers, self.num_directions
        )
        self.fc = nn.Linear(head, config.output_size)

    def encode(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        output, h_n = _run_encoder(self.encoder, x, lengths)
        c = self.config
        return self.drop(readout(c.readout, output, h_n, lengths, self.num_directions))


class SequenceClassifier(_Encoded):
    """``(B, T, I)`` sequences to ``(B, num_classes)`` logits through a readout and a linear layer
    (``ModelConfig("classifier", input_size, num_classes, ...)``).

    Seed 001's ``BiLSTM`` and seed 003's sequential-MNIST model are this with ``readout="last"``
    and ``readout="hn"``.

    Example: seed 003's MNIST model, on a padded batch of two sequences of 28 and 20 rows.

        >>> import torch
        >>> from rnnkit.models import ModelConfig, SequenceClassifier
        >>> config = ModelConfig("classifier", input_size=28, output_size=10, readout="hn")
        >>> model = SequenceClassifier(config)
        >>> model(torch.randn(2, 28, 28), lengths=torch.tensor([28, 20])).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            _check_config("SequenceClassifier", config, "classifier"), config.input_size
        )

    def forward(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        _check_features("SequenceClassifier", x)
        lengths = check_lengths("SequenceClassifier", lengths, x)
        return self.fc(self.encode(x, lengths))  # (B, C)


class SequenceRegressor(_Encoded):
    """``(B, T, I)`` history to the next ``horizon`` values ``(B, horizon)``
    (``ModelConfig("regressor", input_size, horizon, ...)``): seed 000's ``LSTMModel`` with
    ``horizon=1``, seed 003's 24 h -> 2 h load forecaster with ``horizon=4``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(_check_config("SequenceRegressor", config, "regressor"), config.input_size)

    def forward(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        _check_features("SequenceRegressor", x)
        lengths = check_lengths("SequenceRegressor", lengths, x)
        return self.fc(self.encode(x, lengths))  # (B, horizon)


class CharEncoder(nn.Module):
    """Words spelled as character ids ``(N, C)`` -> one vector per word ``(N, 2 * hidden_size)``.

    Each word's characters are embedded and read by a bidirectional recurrent layer (packed, so
    a word's own length is respected); the final states of both directions side by side (the
    forward one after the last character, the backward one after the first) are the word's
    spelling vector. Rows are left-aligned and padded with id 0, at least one character each.
    A batch of sentences repeats its words ("the", ",") many times: identical rows are encoded
    once and their vector is shared, which is exact and cuts most of the work.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 32,
        hidden_size: int = 64,
        cell: str = "lstm",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embedding_dim", embedding_dim),
            ("hidden_size", hidden_size),
        ):
            check_size("CharEncoder", name, value)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.encoder = make_encoder(cell, embedding_dim, hidden_size, 1, True, 0.0, backend)
        self.output_size = 2 * hidden_size

    def forward(self, chars: Tensor) -> Tensor:
        chars = check_tokens("CharEncoder", chars, self.embedding.num_embeddings)
        if chars.shape[0] == 0:
            return chars.new_zeros(0, self.output_size, dtype=self.embedding.weight.dtype)
        unique, inverse = torch.unique(chars, dim=0, return_inverse=True)  # (U, C), (N,)
        lengths = (unique != 0).sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.embedding(unique), lengths, batch_first=True, enforce_sorted=False
        )
        _, hidden = self.encoder(packed)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # (2, U, H)
        vectors = h_n.transpose(0, 1).reshape(unique.shape[0], -1)  # (U, 2H)
        return vectors[inverse]  # (N, 2H)


class Tagger(nn.Module):
    """Seed 002's ``LSTMTagger``: tokens -> embedding -> recurrent layer -> one linear layer per
    step -> ``(B, T, num_tags)`` logits. Word id 0 is padding, id 1 the unknown word.

    With ``char_vocab_size=0`` the input is word ids ``(B, T)``, as in seed 002. With a character
    vocabulary, each token also carries its spelling: the input is ``(B, T, 1 + C)``, the word id
    and then the word's ``C`` character ids (0-padded), and a :class:`CharEncoder` turns every
    spelling into a vector that goes beside the word embedding. An unknown word thus still has a
    representation, from its spelling.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = _check_config("Tagger", config, "tagger")
        self.embedding = nn.Embedding(c.input_size, c.embedding_dim, padding_idx=0)
        self.chars = None
        if c.char_vocab_size:
            self.chars = CharEncoder(
                c.char_vocab_size, c.char_embedding_dim, c.char_hidden_size, c.cell, c.backend
            )
        input_size = c.embedding_dim + (self.chars.output_size if self.chars else 0)
        self.encoder = make_encoder(
            c.cell, input_size, c.hidden_size, c.num_layers, c.bidirectional, c.dropout, c.backend
        )
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear((2 if c.bidirectional else 1) * c.hidden_size, c.output_size)

    def forward(self, tokens: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        if self.chars is None:
            tokens = check_tokens("Tagger", tokens, self.embedding.num_embeddings)
            lengths = check_lengths("Tagger", lengths, tokens)
            x = self.embedding(tokens)  # (B, T, E)
        else:
            words, chars = _split_spelled("Tagger", tokens)
            words = check_tokens("Tagger", words, self.embedding.num_embeddings)
            lengths = check_lengths("Tagger", lengths, words)
            B, T = words.shape
            steps = torch.arange(T, device=words.device)
            real = (
                steps < lengths.to(words.device)[:, None]
                if lengths is not None
                else torch.ones(B, T, dtype=torch.bool, device=words.device)
            )
            spelled = self.chars(chars[real])  # (real words, 2 * Hc)
            # In the spelling encoder's dtype: bfloat16 under autocast.
            spelling = spelled.new_zeros(B, T, self.chars.output_size)
            spelling[real] = spelled  # (B, T, 2 * Hc)
            embedded = self.embedding(words).to(spelled.dtype)  # (B, T, E)
            x = torch.cat([embedded, spelling], -1)  # (B, T, E + 2 * Hc)
        output, _ = _run_encoder(self.encoder, self.drop(x), lengths)  # (B, T, D * H)
        return self.fc(self.drop(output))  # (B, T, num_tags)


def _split_spelled(owner: str, tokens: object) -> tuple[Tensor, Tensor]:
    """``(word ids (B, T), character ids (B, T, C))`` of a spelled batch ``(B, T, 1 + C)``."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[-1] < 2:
        what = format_shape(tokens) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise RNNInputError(
            f"{owner}: with a character encoder the input must be (B, T, 1 + C): per token its "
            f"word id, then C character ids; got {what}"
        )
    return tokens[..., 0], tokens[..., 1:]


class CharRNN(_Encoded):
    """Seed 002's character-level classifier (``ModelConfig("charrnn", vocab_size, num_classes,
    embedding_dim=...)``): character ids ``(B, T)`` -> embedding -> recurrent layer -> readout ->
    ``(B, num_classes)`` logits. Id 0 is padding, id 1 unknown."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(_check_config("CharRNN", config, "charrnn"), config.embedding_dim)
        self.embedding = nn.Embedding(config.input_size, config.embedding_dim, padding_idx=0)

    def forward(self, chars: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        chars = check_tokens("CharRNN", chars, self.embedding.num_embeddings)
        lengths = check_lengths("CharRNN", lengths, chars)
        return self.fc(self.encode(self.embedding(chars), lengths))  # (B, C)


MODELS = {
    "classifier": SequenceClassifier,
    "regressor": SequenceRegressor,
    "tagger": Tagger,
    "charrnn": CharRNN,
}


def build_model(config: ModelConfig | dict) -> nn.Module:
    """The model a :class:`ModelConfig` (or its dict) describes, freshly initialised."""
    if isinstance(config, dict):
        # Run folders of rnnkit 0.1 also saved a regressor's horizon, which is its output_size.
        config = ModelConfig(**{k: v for k, v in config.items() if k != "horizon"})
    c = config
    if c.kind not in MODELS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}; got {c.kind!r}")
    return MODELS[c.kind](c)
