"""The durable-runs benchmark agent: the same no-op work as the Celery baseline's tasks.py."""
import time


def work(i: int) -> dict:
    """The no-op run."""
    return {"i": i}


def stamp(i: int, submitted_at: float) -> dict:
    """Records when its body starts (time.time(), same host as the client)."""
    return {"i": i, "submitted_at": submitted_at, "started_at": time.time()}
