"""The number of CPU cores this process may use: the one count every stage sizes its pools by."""

import os


def cores() -> int:
    """Cores in this process's CPU affinity (a container's or `taskset`'s limit), else the machine's, at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
