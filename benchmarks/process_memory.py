"""This process's resident memory as Linux reports it (``/proc/self/status``), for the peak-memory
columns of the acceptance tables: growth of one call = VmHWM after it − VmRSS before it, with
the peak first set back to the current RSS so that it is the call's own, measured in a child
process started with :data:`EXACT_MALLOC_ENV`."""

import os

#: glibc settings under which resident memory follows the live allocations: every block of
#: 64 KiB or more is a mapping of its own, unmapped when freed, and the heap is trimmed at once
#: (by default freed blocks up to 32 MiB stay resident for reuse, which made a peak read this
#: way vary by tens of MiB from one process to the next).
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}


def child_env() -> dict:
    """The environment for a measuring child process."""
    return {**os.environ, **EXACT_MALLOC_ENV}


def status_bytes(field: str) -> int:
    """``VmRSS``, ``VmHWM``, ... of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Sets VmHWM back to the current RSS (Linux ≥ 4.0; elsewhere the peak stays the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
