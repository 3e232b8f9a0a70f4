"""The bridge's protocol, one file read by both sides (stdlib only): nn_decomp.interop.bridge writes
the request and reads the response; a worker imports this file as its sibling `protocol` and calls
`serve`.

request.json  {"protocol": PROTOCOL, "worker": NAME, "args": {...},
               "tensors": {name: FILE}}, each FILE a safetensors file beside it
response.json {"protocol": PROTOCOL, "result": {...}}, written by the worker into the same dir
"""
import json
import sys
from collections.abc import Callable
from pathlib import Path

PROTOCOL = 1  # bump on any change to these fields, or to what a worker reads from args / returns
REQUEST, RESPONSE = "request.json", "response.json"


def serve(handle: Callable[[dict, dict[str, Path]], dict]) -> None:
    """A worker's main, `python WORKER.py REQUEST_DIR`: the response's result is
    handle(args, {tensors name: its safetensors file})."""
    request_dir = Path(sys.argv[1])
    request = json.loads((request_dir / REQUEST).read_text())
    if request["protocol"] != PROTOCOL:
        sys.exit(f"{request['worker']}: the request speaks protocol {request['protocol']}, this worker "
                 f"{PROTOCOL}: the bridge and its workers come from different versions of nn_decomp")
    files = {name: request_dir / file for name, file in request["tensors"].items()}
    result = handle(request["args"], files)
    (request_dir / RESPONSE).write_text(json.dumps({"protocol": PROTOCOL, "result": result}))
