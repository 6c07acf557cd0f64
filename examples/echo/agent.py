"""The smallest useful agent: a sync entrypoint and a streaming one."""


def echo(message: str) -> dict:
    """Return the message."""
    return {"message": message}


def echo_stream(message: str, n: int = 3):
    """Yield the message n times."""
    for i in range(n):
        yield {"i": i, "message": message}
