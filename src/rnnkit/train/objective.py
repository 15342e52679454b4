"""What ``fit`` minimises and reports: an :class:`Objective` (a loss and one metric).

Every objective sums over a batch's elements and returns the count, so that an epoch's figures are
exact means however the batches fall. Tasks are objectives with their own reports and plots;
``fit`` infers one from the targets when none is given: integer targets are classes (cross-entropy
and accuracy, per step when the output has a time axis, ``-100`` ignored), floating targets are
values (mean squared error and mean absolute error).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# Targets with this value are padding (torch's cross_entropy default).
IGNORE = -100


@dataclass
class Report:
    """The final evaluation of one split: flat metrics for summary.json, the arrays behind them."""

    metrics: dict
    arrays: dict = field(default_factory=dict)


class Objective:
    """Mean cross-entropy and accuracy over the classes of ``y`` (the default for integers)."""

    metric = "accuracy"
    loss_name = "cross-entropy"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss summed over the elements, element count, metric summed over the elements)``."""
        logits, y = out.reshape(-1, out.shape[-1]), y.reshape(-1).long()
        mask = y != IGNORE
        loss = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
        correct = ((logits.argmax(-1) == y) & mask).sum()
        return loss, mask.sum().to(loss.dtype), correct.to(loss.dtype)

    def metric_value(self, metric_sum: float, count: float) -> float:
        return metric_sum / max(count, 1)

    def report(self, out: Tensor, y: Tensor, data: object) -> Report:
        """The test figures of ``out`` against ``y``; ``data`` is the test data as given."""
        loss, count, metric = self.scores(out, y)
        return Report(
            {
                "test_loss": float(loss / count.clamp(min=1)),
                f"test_{self.metric}": self.metric_value(float(metric), float(count)),
                "test_examples": int(y.shape[0]),
            }
        )

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        return []

    # The preprocessing entries that calibrate() learns (a task's prepare() does not make them);
    # fit() calls calibrate() only where there are some.
    calibration_keys: tuple[str, ...] = ()

    def calibrate(self, out: Tensor, y: Tensor, data: object) -> dict:
        """What the objective learns from the best weights' outputs ``out`` on the validation
        data ``data`` (targets ``y``) once training ends, before the test report: entries of the
        run's preprocessing, saved with the model (a forecast's conformal correction); none by
        default."""
        return {}


class Regression(Objective):
    """Mean squared error, reported with the mean absolute error (the default for floats)."""

    metric = "mae"
    loss_name = "mean squared error"

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = y.to(out.dtype).reshape(out.shape)
        loss = nn.functional.mse_loss(out, y, reduction="sum")
        count = torch.tensor(float(y.numel()), dtype=loss.dtype, device=loss.device)
        return loss, count, (out - y).abs().sum()


class FromFunctions(Objective):
    """A loss function and an optional metric function, each returning a batch mean (as
    ``nn.CrossEntropyLoss()`` or ``torchmetrics`` functions do); the metric is taken to be
    better when higher."""

    def __init__(
        self,
        loss: Callable[[Tensor, Tensor], Tensor],
        metric: Callable[[Tensor, Tensor], Tensor] | None,
    ) -> None:
        self.loss, self.metric_fn = loss, metric
        self.loss_name = getattr(loss, "__name__", type(loss).__name__)
        self.metric = getattr(metric, "__name__", type(metric).__name__) if metric else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.metric_fn is not None

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss = self.loss(out, y)
        if loss.dim() != 0:
            raise ValueError(
                f"rnnkit.fit: loss must return one number (a batch mean); got shape "
                f"{tuple(loss.shape)}; use reduction='mean'"
            )
        n = torch.tensor(float(out.shape[0]), dtype=loss.dtype, device=loss.device)
        metric = loss.detach() if self.metric_fn is None else self.metric_fn(out, y)
        return loss * n, n, torch.as_tensor(metric, dtype=loss.dtype).detach() * n


_NAMED = {"accuracy": Objective, "mae": Regression}


def infer(y: Tensor, loss: object, metric: object) -> Objective:
    """The objective for targets like ``y``, or from the ``loss`` and ``metric`` given."""
    if loss is None and metric in (None, *_NAMED):
        if metric is None:
            return Objective() if not y.is_floating_point() else Regression()
        return _NAMED[metric]()
    if loss is None or not callable(loss):
        raise TypeError(
            "rnnkit.fit: loss must be a function (out, y) -> mean loss, or None to infer it from "
            f"the targets; got {type(loss).__name__}"
        )
    if isinstance(metric, str) or (metric is not None and not callable(metric)):
        raise TypeError(
            "rnnkit.fit: with a loss given, metric must be a function (out, y) -> batch mean, "
            f"or None; got {metric!r}"
        )
    return FromFunctions(loss, metric)
