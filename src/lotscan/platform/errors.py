"""Errors the CLI reports as a one-line message (exit code 2) rather than a traceback."""


class TrainingError(ValueError):
    """Training cannot start or continue (missing pretrained weights, a stage to
    reuse without a checkpoint, unknown stage); the message says what to do."""
