"""This process's resident memory as Linux reports it (``/proc/self/status``), for the peak-memory
columns of the acceptance tables: growth of one call = VmHWM after it − VmRSS before it, with
the peak first set back to the current RSS so that it is the call's own."""


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
