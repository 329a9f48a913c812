"""Placeholder: being implemented."""

from lotscan.models.method import AnomalyMethod


class DRDCMethod(AnomalyMethod):
    name = "drdc"
    signal_names = ()
    stages = ()
