"""Joining or starting Ray for a run."""

from __future__ import annotations

import ray


def init_ray(address: str | None, actors: int | None, threads: int) -> bool:
    """Join ``address`` or start a local Ray sized for ``actors`` CPU actors of ``threads`` cores (None:
    Ray detects the GPUs and cores, one actor per GPU); returns whether we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    if actors is None:
        ray.init(include_dashboard=False, log_to_driver=False)
        return True
    # One logical CPU more than the CPU actors use, so the dense-perplexity task runs beside a final pass.
    ray.init(num_cpus=actors * threads + 1, include_dashboard=False, log_to_driver=False)
    return True
