"""The task heads and seed 003's three readouts, checked against hand computations."""

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.models import (
    CharRNN,
    ModelConfig,
    SequenceClassifier,
    SequenceRegressor,
    Tagger,
    build_model,
    readout,
    readout_size,
)

CELL_IDS = ["rnn", "lstm", "gru"]


def _encoder_outputs(lstm: nn.Module, x: torch.Tensor, lengths: list[int]):
    """output and h_n of each sequence run alone, unpadded: the ground truth for a padded batch."""
    outs, hns = [], []
    for b, n in enumerate(lengths):
        out, (h_n, _) = lstm(x[b : b + 1, :n])
        outs.append(out[0])  # (n, D * H)
        hns.append(h_n[:, 0])  # (L * D, H)
    return outs, hns


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_readouts_match_hand_computation_on_packed_batch(bidirectional):
    torch.manual_seed(0)
    H, L, D = 5, 2, 2 if bidirectional else 1
    model = SequenceClassifier(
        ModelConfig("classifier", 3, 4, "lstm", H, L, bidirectional, readout="last")
    )
    x = torch.randn(3, 6, 3)
    lengths = [6, 2, 4]
    # Garbage in the padding must not leak into any readout.
    for b, n in enumerate(lengths):
        x[b, n:] = 1e3
    outs, hns = _encoder_outputs(model.encoder, x, lengths)
    from rnnkit.models import _run_encoder

    output, h_n = _run_encoder(model.encoder, x, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        want_last = outs[b][n - 1]
        want_hn = torch.cat([hns[b][k] for k in range(L * D)])
        want_mean = outs[b][n - 1].view(D, H).mean(0)
        got = {
            k: readout(k, output, h_n, torch.tensor(lengths), D)[b] for k in ("last", "hn", "mean")
        }
        torch.testing.assert_close(got["last"], want_last, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["hn"], want_hn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["mean"], want_mean, rtol=1e-5, atol=1e-6)


def test_last_readout_is_the_forward_end_and_the_backward_start_of_each_sequence():
    # With two directions, "last" holds the forward state after the whole sequence and the
    # backward state after only the last step: check the backward half against a one-step run.
    torch.manual_seed(1)
    H = 4
    model = SequenceClassifier(ModelConfig("classifier", 2, 3, "gru", H, 1, True, readout="last"))
    x = torch.randn(2, 5, 2)
    lengths = torch.tensor([5, 3])
    from rnnkit.models import _run_encoder

    output, h_n = _run_encoder(model.encoder, x, lengths)
    last = readout("last", output, h_n, lengths, 2)
    gru = model.encoder
    for b, n in enumerate(lengths.tolist()):
        _, h_fwd = gru(x[b : b + 1, :n])
        torch.testing.assert_close(last[b, :H], h_fwd[0, 0], rtol=1e-5, atol=1e-6)
        _, h_one = gru(x[b : b + 1, n - 1 : n])
        torch.testing.assert_close(last[b, H:], h_one[1, 0], rtol=1e-5, atol=1e-6)


def test_hn_readout_equals_seed_003_concatenation_unpacked():
    torch.manual_seed(2)
    model = SequenceClassifier(ModelConfig("classifier", 28, 10, "lstm", 7, 2, False, readout="hn"))
    x = torch.randn(4, 9, 28)
    out, (h_n, _) = model.encoder(x)
    feature_map = torch.cat([h_n[i, :, :] for i in range(h_n.shape[0])], dim=-1)
    torch.testing.assert_close(readout("hn", out, h_n, None, 1), feature_map)
    torch.testing.assert_close(model(x), model.fc(feature_map))


def test_mean_readout_equals_seed_003_view_and_mean_unpacked():
    torch.manual_seed(3)
    H = 6
    model = SequenceRegressor(ModelConfig("regressor", 1, 2, "lstm", H, 1, True, readout="mean"))
    x = torch.randn(5, 24, 1)
    output, _ = model.encoder(x)
    seed = output.contiguous().view(5, 24, 2, H).mean(dim=2)[:, -1, :]
    torch.testing.assert_close(model(x), model.fc(seed))


@pytest.mark.parametrize("kind", ["last", "hn", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_readout_sizes_match_the_vectors(kind, bidirectional):
    H, L, D = 5, 3, 2 if bidirectional else 1
    model = SequenceClassifier(
        ModelConfig("classifier", 2, 3, "rnn", H, L, bidirectional, readout=kind)
    )
    from rnnkit.models import _run_encoder

    output, h_n = _run_encoder(model.encoder, torch.randn(4, 7, 2), None)
    assert readout(kind, output, h_n, None, D).shape == (4, readout_size(kind, H, L, D))


@pytest.mark.parametrize("cell", CELL_IDS)
def test_every_head_runs_on_every_cell_with_packed_lengths(cell):
    torch.manual_seed(0)
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(3, 4, 2)
    assert SequenceClassifier(ModelConfig("classifier", 2, 5, cell, 8, 2, True, 0.1, "hn"))(
        x, lengths
    ).shape == (3, 5)
    assert SequenceRegressor(ModelConfig("regressor", 2, 4, cell, 8))(x).shape == (3, 4)
    ids = torch.randint(2, 10, (3, 4))
    assert Tagger(ModelConfig("tagger", 10, 6, cell, 8, bidirectional=True, embedding_dim=4))(
        ids, lengths
    ).shape == (3, 4, 6)
    assert CharRNN(
        ModelConfig("charrnn", 10, 3, cell, 8, bidirectional=True, readout="mean", embedding_dim=4)
    )(ids, lengths).shape == (
        3,
        3,
    )


def test_padding_never_changes_a_prediction():
    torch.manual_seed(0)
    model = CharRNN(
        ModelConfig("charrnn", 12, 3, "lstm", 8, bidirectional=True, embedding_dim=4)
    ).eval()
    seq = torch.tensor([[5, 6, 7]])
    alone = model(seq, torch.tensor([3]))
    padded = torch.tensor([[5, 6, 7, 9, 9], [2, 3, 4, 5, 6]])
    torch.testing.assert_close(model(padded, torch.tensor([3, 5]))[:1], alone, rtol=1e-5, atol=1e-6)


def test_build_model_rebuilds_the_same_architecture_from_its_config():
    torch.manual_seed(0)
    original = Tagger(ModelConfig("tagger", 20, 7, "gru", 9, 2, True, 0.2, embedding_dim=6))
    clone = build_model(ModelConfig(**original.config.to_dict()))
    clone.load_state_dict(original.state_dict())
    ids = torch.randint(0, 20, (2, 5))
    original.eval(), clone.eval()
    torch.testing.assert_close(clone(ids), original(ids))
    assert rnnkit.count_parameters(clone) == rnnkit.count_parameters(original)


def test_models_run_on_an_explicit_engine():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    ref = SequenceClassifier(ModelConfig("classifier", 4, 2, "lstm", 5, backend="reference"))
    assert ref.encoder.backend == "reference"
    assert ref(x).shape == (2, 2)


def test_bad_model_arguments_name_the_choices():
    with pytest.raises(ValueError, match="readout must be one of last, hn, mean; got 'first'"):
        SequenceClassifier(ModelConfig("classifier", 2, 3, readout="first"))
    with pytest.raises(ValueError, match="cell must be one of rnn, lstm, gru; got 'transformer'"):
        SequenceClassifier(ModelConfig("classifier", 2, 3, cell="transformer"))
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        SequenceRegressor(ModelConfig("regressor", 1, 0))


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (
            torch.tensor([5, 2]),
            r"one length per sequence, shape \(3,\) for a batch of 3; got shape \(2,\)",
        ),
        (torch.tensor([5, 2, 9]), r"between 1 and the padded length T=5; got 9"),
        (torch.tensor([5, 0, 1]), r"between 1 and the padded length T=5; got 0"),
        (torch.tensor([[5, 2, 1]]), r"shape \(3,\) for a batch of 3; got shape \(1, 3\)"),
        (torch.tensor([5.0, 2.5, 1.0]), r"must be an integer tensor .* got dtype torch.float32"),
        ([5, 2.5, 1], r"whole numbers of steps; got 2.5"),
        (torch.tensor([5, 2, 1], device="meta"), r"lengths is on meta but the input is on cpu"),
        ("5,2,1", r"a 1-D tensor \(or list\) of ints"),
    ],
    ids=["too-few", "beyond-T", "zero", "2-D", "fractional", "fractional-list", "device", "str"],
)
def test_classifier_refuses_lengths_that_do_not_fit_the_batch(lengths, message):
    model = SequenceClassifier(ModelConfig("classifier", 3, 4))
    with pytest.raises(rnnkit.RNNInputError, match=message) as caught:
        model(torch.randn(3, 5, 3), lengths)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)


def test_lengths_as_a_list_or_tuple_of_ints_equal_a_tensor():
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig("classifier", 3, 4)).eval()
    x = torch.randn(3, 5, 3)
    want = model(x, torch.tensor([5, 2, 4]))
    torch.testing.assert_close(model(x, [5, 2, 4]), want)
    torch.testing.assert_close(model(x, (5, 2, 4)), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Tagger(ModelConfig("tagger", 10, 3, embedding_dim=4)),
        lambda: CharRNN(ModelConfig("charrnn", 10, 3, "gru", embedding_dim=4)),
    ],
    ids=["tagger", "charrnn"],
)
def test_token_ids_outside_the_vocabulary_are_named(make):
    model = make()
    with pytest.raises(rnnkit.RNNInputError, match=r"token id 10 is outside .* vocab_size=10"):
        model(torch.tensor([[1, 2, 10]]))
    with pytest.raises(rnnkit.RNNInputError, match=r"token id -2 is outside"):
        model(torch.tensor([[1, -2, 3]]), torch.tensor([3]))
    with pytest.raises(rnnkit.RNNInputError, match=r"integer token ids .* got dtype torch.float32"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(rnnkit.RNNInputError, match=r"padded batch of token ids \(B, T\)"):
        model(torch.tensor([1, 2]))


def test_classifier_refuses_an_unbatched_input():
    with pytest.raises(rnnkit.RNNInputError, match=r"\(B, T, input_size\); got \(5, 3\)"):
        SequenceClassifier(ModelConfig("classifier", 3, 4))(torch.randn(5, 3))


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: SequenceClassifier(ModelConfig("classifier", 3, 0)),
            ValueError,
            "num_classes must be at least 1; got 0",
        ),
        (
            lambda: SequenceClassifier(ModelConfig("classifier", 0, 2)),
            ValueError,
            "input_size must be at least 1; got 0",
        ),
        (
            lambda: SequenceClassifier(ModelConfig("classifier", 3, 2, hidden_size=2.5)),
            TypeError,
            "hidden_size must be an int",
        ),
        (
            lambda: SequenceClassifier(ModelConfig("classifier", 3, 2, num_layers=0)),
            ValueError,
            "num_layers must be at least 1",
        ),
        (
            lambda: SequenceClassifier(ModelConfig("classifier", 3, 2, dropout=float("nan"))),
            ValueError,
            "dropout must be",
        ),
        (
            lambda: SequenceRegressor(ModelConfig("regressor", 3, 0)),
            ValueError,
            "horizon must be at least 1",
        ),
        (
            lambda: Tagger(ModelConfig("tagger", 0, 3, embedding_dim=4)),
            ValueError,
            "Tagger: vocab_size must be at least 1",
        ),
        (
            lambda: Tagger(ModelConfig("tagger", 10, 0, embedding_dim=4)),
            ValueError,
            "Tagger: num_tags must be at least 1",
        ),
        (
            lambda: CharRNN(ModelConfig("charrnn", 10, 3, embedding_dim=0)),
            ValueError,
            "embedding_dim must be at least 1",
        ),
    ],
    ids=[
        "classes",
        "input",
        "hidden-float",
        "layers",
        "dropout-nan",
        "horizon",
        "vocab",
        "tags",
        "embedding",
    ],
)
def test_model_constructors_refuse_bad_sizes_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()
