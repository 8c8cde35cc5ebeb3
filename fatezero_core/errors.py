"""Errors raised by fatezero_core.

Every error says what is wrong and what to change. Nodes show the message as-is, so it is written
for an artist wiring a graph, not for a developer reading a traceback.
"""


class FateZeroError(ValueError):
    """Base class: bad input or settings that the user can fix."""


class StoreMismatchError(FateZeroError):
    """The attention store was captured with settings that differ from the edit: another model,
    frame count, size, step count or key-frame setting, so its attention would not line up."""


class StoreReleasedError(FateZeroError):
    """The attention store was released, or its capture never finished."""


class StoreTooLargeError(FateZeroError):
    """The chosen store placement cannot hold the capture in the memory (or disk space) that is
    free; raised before the inversion runs."""


class PromptError(FateZeroError):
    """A prompt, word list or word mapping that cannot be aligned."""


class VideoError(FateZeroError):
    """A video or image sequence that cannot be read or resized as asked."""


class CheckpointError(FateZeroError):
    """A model checkpoint that cannot be mapped or loaded."""


class MetricsError(FateZeroError):
    """Frames, models or prompts that the video metrics cannot measure."""
