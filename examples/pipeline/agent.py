"""A durable pipeline: processes documents one by one, checkpointing after each, so that a retry
(after a crash, a restart or an error) resumes where the last attempt stopped.

Run it durably:
    agentry runs create pipeline process --input '{"documents": ["a", "b", "c"]}' --wait
"""
import time


def process(documents: list, seconds_per_document: float = 0.2, ctx=None) -> dict:
    """Summarise each document; resumable, cancellable, and it reports progress as events."""
    state = ctx.state or {"done": 0, "summaries": []}
    if state["done"]:
        ctx.log(f"attempt {ctx.attempt} resumes after {state['done']} document(s)")
    for index in range(state["done"], len(documents)):
        if ctx.cancelled:
            raise RuntimeError("stopped on request")
        time.sleep(seconds_per_document)  # the real work goes here
        state["summaries"].append(f"summary of {documents[index]}")
        state["done"] = index + 1
        ctx.checkpoint(state)
        ctx.emit("progress", {"done": state["done"], "total": len(documents)})
    return {"summaries": state["summaries"], "attempts": ctx.attempt}


def validate(documents: list, ctx=None) -> dict:
    """Rejects bad input for good: a retry cannot fix it."""
    if not documents:
        raise ctx.NonRetriableError("no documents to process")
    return {"ok": True, "count": len(documents)}
