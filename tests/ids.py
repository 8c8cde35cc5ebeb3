"""Readable test ids shared by both tiers."""


def placement_id(placement: str) -> str:
    """A store placement: ``gpu`` keeps tensors where they were computed, which on a CPU-only run
    is the CPU, and the id says so."""
    return "in-place-on-cpu" if placement == "gpu" else placement
