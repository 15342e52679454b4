"""The tasks of ``rnnkit train``: each reads its data and knows its loss, metrics and plots."""

from rnnkit.tasks.base import Prepared, Split, Task
from rnnkit.tasks.classify import DigitsTask, MnistTask, TextClassificationTask
from rnnkit.tasks.forecast import ForecastTask
from rnnkit.tasks.tagger import TaggerTask
from rnnkit.train.objective import Report

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (DigitsTask, MnistTask, ForecastTask, TaggerTask, TextClassificationTask)
}

__all__ = ["TASKS", "Prepared", "Report", "Split", "Task"]
