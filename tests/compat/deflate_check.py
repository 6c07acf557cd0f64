"""Streams `echo_stream` over RunAgent's WebSocket route with a client that offers
permessage-deflate (the websockets library does by default, as RunAgent's SDKs' servers expect)
and prints, as one JSON line, what was negotiated and every frame received.

Usage: deflate_check.py WS_URL N
"""

import json
import sys

from websockets.sync.client import connect

url, n = sys.argv[1], int(sys.argv[2])
frames = []
with connect(url, open_timeout=10, max_size=None) as ws:
    extensions = [ext.name for ext in ws.protocol.extensions]
    start = {
        "entrypoint_tag": "echo_stream",
        "input_args": [],
        "input_kwargs": {"message": "z" * 200, "n": n},
    }
    ws.send(json.dumps(start))
    for message in ws:
        frames.append(json.loads(message))
    close_code = ws.close_code
print(json.dumps({"extensions": extensions, "frames": frames, "close_code": close_code}))
