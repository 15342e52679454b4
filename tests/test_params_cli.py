"""Parameter counts (closed form equals measured), the ``params`` and ``shapes`` commands."""

import itertools
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.cli import main

GRID = [
    (mode, layers, bidir, bias, proj)
    for mode, layers, bidir, bias, proj in itertools.product(
        ("rnn", "lstm", "gru"), (1, 2, 3), (False, True), (True, False), (0, 3)
    )
    if not (proj and mode != "lstm")
]


@pytest.mark.parametrize("mode, layers, bidir, bias, proj", GRID)
def test_param_count_equals_count_parameters(mode, layers, bidir, bias, proj):
    kwargs = dict(num_layers=layers, bias=bias, bidirectional=bidir)
    if proj:
        kwargs["proj_size"] = proj
    layer = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[mode](6, 8, **kwargs)
    torch_layer = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[mode](
        6, 8, **kwargs
    )
    pc = rnnkit.param_count(mode, 6, 8, layers, bias, bidir, proj)
    assert pc.total == rnnkit.count_parameters(layer) == rnnkit.count_parameters(torch_layer)
    assert [(n, s) for n, s, _ in pc.tensors] == [
        (n, tuple(p.shape)) for n, p in layer.named_parameters()
    ]
    assert sum(pc.per_layer) == pc.total


def test_lstm_has_four_times_and_gru_three_times_the_parameters_of_rnn():
    rnn = rnnkit.param_count("rnn", 10, 20).total
    assert rnnkit.param_count("lstm", 10, 20).total == 4 * rnn
    assert rnnkit.param_count("gru", 10, 20).total == 3 * rnn


def test_count_parameters_trainable_only():
    layer = rnnkit.GRU(3, 4)
    layer.bias_hh_l0.requires_grad_(False)
    assert (
        rnnkit.count_parameters(layer, trainable_only=True) == rnnkit.count_parameters(layer) - 12
    )


def test_param_count_rejects_unknown_mode_and_projection_outside_lstm():
    with pytest.raises(ValueError, match="mode must be one of rnn, lstm, gru; got 'transformer'"):
        rnnkit.param_count("transformer", 3, 4)
    with pytest.raises(ValueError, match="proj_size is only supported for lstm"):
        rnnkit.param_count("gru", 3, 4, proj_size=2)


def test_params_command_prints_each_tensor_the_formula_and_the_total(capsys):
    assert (
        main(["params", "lstm", "--input-size", "10", "--hidden-size", "20", "--num-layers", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "weight_ih_l0  (80, 10)    800" in out
    assert "bias_hh_l1    (80,)        80" in out
    assert "formula:" in out and "G=4" in out
    assert "layer 0: 2,560" in out and "layer 1: 3,360" in out
    assert "total: 5,920 parameters" in out


def test_shapes_command_prints_every_tensor_with_its_shape(capsys):
    argv = [
        "shapes",
        "lstm",
        "--input-size",
        "10",
        "--hidden-size",
        "20",
        "--num-layers",
        "2",
        "--seq-len",
        "5",
        "--batch",
        "3",
        "--batch-first",
        "--bidirectional",
    ]
    assert main(argv) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "(3, 5, 10)" in lines["input"]
    assert "(4, 3, 20)" in lines["h0"] and "(4, 3, 20)" in lines["c0"]
    assert "(3, 5, 40)" in lines["output"]
    assert "(4, 3, 20)" in lines["h_n"] and "(4, 3, 20)" in lines["c_n"]
    # The shapes printed are the shapes a real layer produces.
    out, (hn, _cn) = rnnkit.LSTM(10, 20, 2, batch_first=True, bidirectional=True)(
        torch.randn(3, 5, 10)
    )
    assert str(tuple(out.shape)) in lines["output"] and str(tuple(hn.shape)) in lines["h_n"]


def test_shapes_command_for_gru_has_no_cell_state(capsys):
    main(
        [
            "shapes",
            "gru",
            "--input-size",
            "4",
            "--hidden-size",
            "6",
            "--seq-len",
            "7",
            "--batch",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "c0" not in out and "(7, 2, 6)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["params", "gru", "--input-size", "3", "--hidden-size", "4", "--proj-size", "2"],
            "--proj-size is only supported for lstm",
        ),
        (
            ["params", "lstm", "--input-size", "0", "--hidden-size", "4"],
            "--input-size must be a positive integer, got 0",
        ),
        (
            ["params", "lstm", "--input-size", "3", "--hidden-size", "4", "--proj-size", "4"],
            "--proj-size must be 0 or between 1 and hidden_size - 1 = 3",
        ),
    ],
)
def test_cli_rejects_bad_arguments_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnkit",
            "params",
            "rnn",
            "--input-size",
            "1",
            "--hidden-size",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "total: 10 parameters" in result.stdout


def test_demo_shows_shapes_counts_and_parity(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 15,040 (closed form: 15,040; torch.nn: 15,040)" in out
    assert "MISMATCH" not in out and "parity: ok" in out
