"""The study joulegate's figures are shown beside: Luccioni, Jernite & Strubell, "Power Hungry
Processing" (FAccT 2024), Table 2: kWh per 1,000 inferences by task, A100, batch size 1."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class StudyFigure:
    study_task: str
    kwh_per_1000_mean: float
    kwh_per_1000_std: float


def study_figures() -> dict[str, StudyFigure]:
    """The study's mean per joulegate task (tasks the study split up, under `other`, left out)."""
    text = resources.files("proxy").joinpath("data/power_hungry_processing_table2.csv").read_text()
    figures = {}
    for row in csv.DictReader(text.splitlines()):
        if row["joulegate_task"] != "other":
            figures[row["joulegate_task"]] = StudyFigure(
                row["task"],
                float(row["kwh_per_1000_inferences_mean"]),
                float(row["kwh_per_1000_inferences_std"]),
            )
    return figures
