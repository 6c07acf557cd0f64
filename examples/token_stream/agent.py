"""Streams tokens the way an LLM does: a slow sync generator. It runs in its own worker, so it
never stalls the server or other calls (RunAgent iterates these on its event loop)."""
import time

TEXT = "Agentry streams each token to the client as soon as the generator yields it."


def complete_stream(prompt: str, delay_s: float = 0.05, max_tokens: int = 64):
    """Yield the answer token by token. The `_stream` tag suffix is what makes it a stream."""
    for i, token in enumerate(f"{prompt} -> {TEXT}".split()):
        if i >= max_tokens:
            break
        time.sleep(delay_s)
        yield {"token": token, "index": i}
