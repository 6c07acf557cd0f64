"""Async entrypoints: many calls share one worker while they await I/O."""
import asyncio


async def fetch(url: str, latency_s: float = 0.2) -> dict:
    """Pretend to call a slow API (an LLM, a database) without blocking other calls."""
    await asyncio.sleep(latency_s)
    return {"url": url, "status": 200}


async def poll_stream(checks: int = 3, every_s: float = 0.1):
    """An async generator: report progress while waiting."""
    for i in range(checks):
        await asyncio.sleep(every_s)
        yield {"check": i + 1, "of": checks}
