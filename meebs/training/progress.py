"""The training progress bar: epoch, steps, loss, learning rate, speed and time left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SpeedColumn(ProgressColumn):
    def render(self, task) -> str:
        return f"{task.speed or 0:.2f} it/s"


def progress_bar(console: Console, epochs: int) -> Progress:
    """A bar whose task carries the fields `epoch`, `loss` and `lr`."""
    return Progress(
        TextColumn("epoch {task.fields[epoch]}/" + str(epochs)),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        SpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
