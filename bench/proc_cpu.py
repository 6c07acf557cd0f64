"""CPU seconds of a process tree from /proc, for the benchmark clients (runs.py, pgqueuer/bench.py)."""
import os


def tree_cpu_s(pid, reaped=False):
    """utime+stime of pid and its direct children; with reaped, also the children it waited for
    (PostgreSQL's ended backends, counted in its postmaster's cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
            if reaped and int(entry) == pid:
                total += (int(fields[13]) + int(fields[14])) / tick
    return total
