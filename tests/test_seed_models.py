"""The models of the seed posts run with rnnkit in place of torch.nn and give the same numbers.

Each model is written as in its post, with the layer class passed in (``rnn_lib`` is ``torch.nn``
or ``rnnkit``); the torch.nn build's weights are loaded into the rnnkit build.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnkit


class LSTMModel(nn.Module):
    """Seed 000: 2-layer LSTM, batch_first, linear on the last step."""

    def __init__(self, rnn_lib, input_size, hidden_size, num_layers, output_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = rnn_lib.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1, :])


class BiLSTM(nn.Module):
    """Seed 001: bidirectional LSTM classifier on the last step."""

    def __init__(self, rnn_lib, input_size, hidden_size, num_layers, num_classes):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = rnn_lib.LSTM(
            input_size, hidden_size, num_layers, batch_first=True, bidirectional=True
        )
        self.fc = nn.Linear(hidden_size * 2, num_classes)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers * 2, x.size(0), self.hidden_size).to(x)
        c0 = torch.zeros(self.num_layers * 2, x.size(0), self.hidden_size).to(x)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1, :])


class LSTMTagger(nn.Module):
    """Seed 002: embedding + LSTM + linear + log_softmax, one sentence at a time."""

    def __init__(self, rnn_lib, embedding_dim, hidden_dim, vocab_size, tagset_size):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.word_embeddings = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = rnn_lib.LSTM(embedding_dim, hidden_dim)
        self.hidden2tag = nn.Linear(hidden_dim, tagset_size)
        self.hidden = self.init_hidden()

    def init_hidden(self):
        return (
            torch.zeros(1, 1, self.hidden_dim, dtype=torch.float64),
            torch.zeros(1, 1, self.hidden_dim, dtype=torch.float64),
        )

    def forward(self, sentence):
        embeds = self.word_embeddings(sentence)
        lstm_out, self.hidden = self.lstm(embeds.view(len(sentence), 1, -1), self.hidden)
        tag_space = self.hidden2tag(lstm_out.view(len(sentence), -1))
        return F.log_softmax(tag_space, dim=1)


class DirectionMeanBiLSTM(nn.Module):
    """Seed 003: bidirectional LSTM whose two directions are averaged before the linear."""

    def __init__(self, rnn_lib, input_size, hidden_size, num_layers, output_size, batch_size):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_directions = 2
        self.batch_size = batch_size
        self.lstm = rnn_lib.LSTM(
            input_size, hidden_size, num_layers, batch_first=True, bidirectional=True
        )
        self.linear = nn.Linear(hidden_size, output_size)

    def forward(self, input_seq, h_0, c_0):
        seq_len = input_seq.shape[1]
        input_seq = input_seq.view(self.batch_size, seq_len, self.input_size)
        output, _ = self.lstm(input_seq, (h_0, c_0))
        output = output.contiguous().view(
            self.batch_size, seq_len, self.num_directions, self.hidden_size
        )
        output = torch.mean(output, dim=2)
        pred = self.linear(output)
        return pred[:, -1, :]


class LSTM_Model(nn.Module):
    """Seed 003: sequential-MNIST LSTM whose linear reads h_n of every layer."""

    def __init__(self, rnn_lib, input_dim, hidden_dim, layer_dim, output_dim):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layer_dim = layer_dim
        self.lstm = rnn_lib.LSTM(input_dim, hidden_dim, layer_dim, batch_first=True)
        self.fc = nn.Linear(hidden_dim * layer_dim, output_dim)

    def forward(self, x):
        h0 = torch.zeros(self.layer_dim, x.size(0), self.hidden_dim).requires_grad_().to(x)
        c0 = torch.zeros(self.layer_dim, x.size(0), self.hidden_dim).requires_grad_().to(x)
        lstm_out, (h_n, cn) = self.lstm(x, (h0.detach(), c0.detach()))
        feature_map = torch.cat([h_n[i, :, :] for i in range(h_n.shape[0])], dim=-1)
        return self.fc(feature_map)


def _twin_models(build):
    torch.manual_seed(0)
    ref = build(nn).double()
    ours = build(rnnkit).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_same(ref, ours, *inputs):
    grads = []
    outs = []
    for model in (ref, ours):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = model(*leaves)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(
            [t.grad for t in leaves if t.is_floating_point()] + [p.grad for p in model.parameters()]
        )
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads[1], grads[0], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_seed000_lstm_model():
    ref, ours = _twin_models(lambda lib: LSTMModel(lib, 10, 20, 2, 1))
    _assert_same(ref, ours, torch.randn(16, 5, 10, dtype=torch.float64))


def test_seed001_bilstm_classifier():
    ref, ours = _twin_models(lambda lib: BiLSTM(lib, 10, 20, 2, 2))
    _assert_same(ref, ours, torch.randn(3, 5, 10, dtype=torch.float64))


def test_seed002_lstm_tagger():
    ref, ours = _twin_models(lambda lib: LSTMTagger(lib, 6, 6, 9, 3))
    _assert_same(ref, ours, torch.tensor([0, 4, 2, 8, 1]))


def test_seed003_direction_mean_bilstm():
    ref, ours = _twin_models(lambda lib: DirectionMeanBiLSTM(lib, 7, 16, 2, 2, batch_size=30))
    x = torch.randn(30, 24, 7, dtype=torch.float64)
    h0 = torch.randn(4, 30, 16, dtype=torch.float64)
    c0 = torch.randn(4, 30, 16, dtype=torch.float64)
    _assert_same(ref, ours, x, h0, c0)


@pytest.mark.parametrize("layers", [1, 2])
def test_seed003_hn_readout_lstm_model(layers):
    ref, ours = _twin_models(lambda lib: LSTM_Model(lib, 28, 100, layers, 10))
    _assert_same(ref, ours, torch.randn(4, 28, 28, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["RNN", "GRU"])
def test_seed003_rnn_and_gru_snippets(kind):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(input_size=10, hidden_size=20, num_layers=2).double()
    ours = getattr(rnnkit, kind)(input_size=10, hidden_size=20, num_layers=2).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inp = torch.randn(5, 3, 10, dtype=torch.float64)
    h0 = torch.randn(2, 3, 20, dtype=torch.float64)

    class Snippet(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, h):
            output, hn = self.rnn(x, h)
            assert output.shape == (5, 3, 20) and hn.shape == (2, 3, 20)
            return output.sum() + 2 * hn.sum()

    _assert_same(Snippet(ref), Snippet(ours), inp, h0)


def test_seed003_lstm_snippet():
    torch.manual_seed(0)
    ref = nn.LSTM(input_size=10, hidden_size=20, num_layers=2).double()
    ours = rnnkit.LSTM(input_size=10, hidden_size=20, num_layers=2).double()
    ours.load_state_dict(ref.state_dict(), strict=True)

    class Snippet(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, h0, c0):
            output, (hn, cn) = self.rnn(x, (h0, c0))
            return output.sum() + hn.sum() - cn.sum()

    _assert_same(
        Snippet(ref),
        Snippet(ours),
        *(torch.randn(s, dtype=torch.float64) for s in ((5, 3, 10), (2, 3, 20), (2, 3, 20))),
    )
