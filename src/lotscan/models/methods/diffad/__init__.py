"""Placeholder: being implemented."""

from lotscan.models.method import AnomalyMethod


class DiffADMethod(AnomalyMethod):
    name = "diffad"
    signal_names = ()
    stages = ()
