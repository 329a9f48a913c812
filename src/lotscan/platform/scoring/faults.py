"""What stops a run, and what only fails an image.

- :class:`ModelFault`: the model itself is broken (non-finite scores, a probe
  image it cannot score, an exception on every image of a batch). The run
  stops with a clear error and writes nothing for the batch: writing per-image
  failures would block the next run with a fixed bundle from ever scoring
  those images.
- Anything else one image triggers in the scorer becomes a permanent failure
  row of that image (its reason kept); the rest of its batch is scored.
"""

from __future__ import annotations


class ModelFault(RuntimeError):
    """The model cannot score; the run stops (nothing is recorded for the batch)."""

    def __reduce__(self):
        return (type(self), (str(self),))


class ScoringError(RuntimeError):
    """A scoring run stopped; the message says why and what was kept."""


def unwrap(err: BaseException) -> BaseException:
    """The lotscan exception behind Ray's task/actor error wrappers, if any."""
    from lotscan.config import ConfigError
    from lotscan.models.bundle import BundleError
    from lotscan.platform.readers import InputError
    from lotscan.platform.storage import StorageError

    ours = (ModelFault, InputError, StorageError, BundleError, ConfigError)
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 10:
        seen += 1
        if isinstance(current, ours):
            return current
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException) and cause is not current:
            current = cause
            continue
        current = current.__cause__ or current.__context__
    # An actor whose constructor raised reaches us as ActorDiedError, which
    # keeps the cause's text only.
    marker = "ModelFault: "
    text = str(err)
    if marker in text:
        return ModelFault(text.split(marker, 1)[1].strip().splitlines()[0])
    return err
