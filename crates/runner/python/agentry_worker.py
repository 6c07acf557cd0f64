"""Agentry worker shim: runs one agent's entrypoints inside a warm Python process.

Stdlib only. The server writes this file out and starts `python agentry_worker.py`, with the
protocol socket on file descriptor 3 (AGENTRY_FD), so that anything the agent prints on stdout or
stderr can never corrupt the protocol: the server turns those streams into log lines.

Frames: a 4-byte big-endian length, then a body of that many bytes. The body's first byte is the
message kind. Every message after the hello names its call by a u32 request id.

server -> worker
  C id:u32 json{"e": tag, "a": [args], "k": {kwargs}, "w": window}   start a call
  X id:u32                                                             cancel a call
  W id:u32 n:u32                                                       grant n more stream chunks
  Q 0:u32                                                              exit now (shutdown)
  A id:u32 saved:u8                                                    a checkpoint was (not) saved
worker -> server
  H json{protocol, pid, python, entrypoints, errors}                   hello, once, first
  R id:u32 type:u8 payload                                             result of a call
  D id:u32 type:u8 payload                                             one stream chunk
  E id:u32 count:u32                                                   end of a stream
  F id:u32 json{type, message, traceback, cancelled, retriable}        the call failed
  V id:u32 len:u16 kind payload                                        ctx.emit (durable runs)
  L id:u32 level:u8 message                                            ctx.log (durable runs)
  K id:u32 payload                                                     ctx.checkpoint; waits for A

A call of a durable run carries "r": {"id", "attempt", "state"}; an entrypoint that declares a
context parameter (named `ctx`, or annotated with a class named `RunContext`) receives a
RunContext built from it (or an inert one for plain invocations).

`payload` is the value as `json.dumps(value, ensure_ascii=False)` text, after RunAgent's own
conversions (CoreSerializer), and `type` indexes TYPE_NAMES. A payload is built once here and the
server reuses those bytes for every protocol it speaks.
"""

import collections
import collections.abc
import datetime as _dt
import inspect
import json
import math
import os
import select
import socket
import threading
import struct
import sys
import traceback
import typing
from time import perf_counter as _clock

PROTOCOL_VERSION = 2
MAX_FRAME = int(os.environ.get("AGENTRY_MAX_FRAME", str(16 * 1024 * 1024)))
TYPE_NAMES = ["null", "boolean", "integer", "number", "string", "array", "object"]
TYPE_CODE = {name: i for i, name in enumerate(TYPE_NAMES)}

asyncio = None  # imported by main() when the agent has async entrypoints

_HDR = struct.Struct(">I")
_ID = struct.Struct(">IcI")  # length, kind, id
_ID_TYPE = struct.Struct(">IcIB")  # length, kind, id, type
_END = struct.Struct(">IcII")
_EMIT = struct.Struct(">IcIH")  # length, kind, id, event-kind length


# --------------------------------------------------------------------------------------------
# RunAgent's CoreSerializer (runagent/utils/serializer.py, 0.1.49), kept behaviour for behaviour
# so that `{type, payload}` strings are byte-identical to the original server's.
# --------------------------------------------------------------------------------------------

def _determine_type(obj):
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, int):
        return "integer"
    if isinstance(obj, float):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, (list, tuple, set)):
        return "array"
    if isinstance(obj, dict):
        return "object"
    if hasattr(obj, "to_dict") or hasattr(obj, "model_dump") or hasattr(obj, "dict") or hasattr(obj, "__dict__"):
        return "object"
    return "string"


def _prepare(obj):
    # Exact built-in types first: same result as the general path below, a fraction of the cost.
    cls = type(obj)
    if cls is str or cls is int or cls is bool or obj is None:
        return obj
    if cls is dict:
        return {k: _prepare(v) for k, v in obj.items()}
    if cls is list:
        return [_prepare(item) for item in obj]
    return _prepare_general(obj)


def _prepare_general(obj):
    if obj is None:
        return None
    if isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return str(obj)
        return obj
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, set):
        return list(obj)
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if hasattr(obj, "to_dict") and callable(getattr(obj, "to_dict")):
        try:
            return obj.to_dict()
        except Exception:
            pass
    if hasattr(obj, "model_dump"):
        try:
            return obj.model_dump()
        except Exception:
            pass
    if hasattr(obj, "dict"):
        try:
            return obj.dict()
        except Exception:
            pass
    if isinstance(obj, (list, tuple)):
        return [_prepare(item) for item in obj]
    if isinstance(obj, dict):
        return {k: _prepare(v) for k, v in obj.items()}
    return obj


def _fallback(obj):
    try:
        if hasattr(obj, "__dataclass_fields__"):
            from dataclasses import asdict
            return asdict(obj)
        if hasattr(obj, "model_dump"):
            return obj.model_dump()
        if hasattr(obj, "dict"):
            return obj.dict()
        if hasattr(obj, "__dict__"):
            return obj.__dict__
        return str(obj)
    except Exception:
        return f"<Unserializable {type(obj).__name__}>"


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_fallback).encode


def encode_value(obj):
    """Returns (type code, payload bytes), exactly as RunAgent's serialize_object_to_structured."""
    try:
        data_type = _determine_type(obj)
        payload = _dumps(_prepare(obj))
        return TYPE_CODE[data_type], payload.encode("utf-8", "backslashreplace")
    except Exception as e:  # RunAgent turns serialisation failures into an error object
        payload = json.dumps({"error": f"Serialization Error: {str(e)}", "original_type": str(type(obj))})
        return TYPE_CODE["object"], payload.encode("utf-8")


# --------------------------------------------------------------------------------------------
# Extractor: RunAgent applies `{out_key: JSONPath}` (jsonpath_ng) to results and stream chunks.
# We support the JSONPath subset agents use: $, .name, ['name'], [index] (negative too), [*], ..name
# --------------------------------------------------------------------------------------------

def _jsonpath_tokens(path):
    tokens, i, n = [], 0, len(path)
    if path.startswith("$"):
        i = 1
    while i < n:
        c = path[i]
        if path.startswith("..", i):
            i += 2
            j = i
            while j < n and path[j] not in ".[":
                j += 1
            tokens.append(("deep", path[i:j]))
            i = j
        elif c == ".":
            i += 1
            j = i
            while j < n and path[j] not in ".[":
                j += 1
            name = path[i:j]
            tokens.append(("all", None) if name == "*" else ("key", name))
            i = j
        elif c == "[":
            j = path.index("]", i)
            inner = path[i + 1:j].strip()
            if inner == "*":
                tokens.append(("all", None))
            elif inner[:1] in "'\"":
                tokens.append(("key", inner[1:-1]))
            else:
                tokens.append(("index", int(inner)))
            i = j + 1
        else:
            j = i
            while j < n and path[j] not in ".[":
                j += 1
            tokens.append(("key", path[i:j]))
            i = j
    return tokens


def _walk_deep(value, name, out):
    if isinstance(value, dict):
        if name in value:
            out.append(value[name])
        for v in value.values():
            _walk_deep(v, name, out)
    elif isinstance(value, list):
        for v in value:
            _walk_deep(v, name, out)


def jsonpath_first(value, path):
    """First match of `path` in `value`, or None when nothing matches (RunAgent's rule)."""
    try:
        current = [value]
        for kind, arg in _jsonpath_tokens(path):
            nxt = []
            for v in current:
                if kind == "key" and isinstance(v, dict) and arg in v:
                    nxt.append(v[arg])
                elif kind == "index" and isinstance(v, list) and -len(v) <= arg < len(v):
                    nxt.append(v[arg])
                elif kind == "all":
                    nxt.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else [])
                elif kind == "deep":
                    _walk_deep(v, arg, nxt)
            current = nxt
        return current[0] if current else None
    except Exception:
        return None


def apply_extractor(extractor, value):
    if not extractor:
        return value
    data = _prepare(value)
    if not isinstance(data, (dict, list)):
        try:
            data = json.loads(_dumps(data))
        except Exception:
            pass
    return {key: jsonpath_first(data, path) for key, path in extractor.items()}


# --------------------------------------------------------------------------------------------
# Importing entrypoints with RunAgent's semantics (runagent/utils/imports.py, PackageImporter)
# --------------------------------------------------------------------------------------------

PROJECT_INDICATORS = ["__init__.py", "setup.py", "pyproject.toml", "requirements.txt", ".git", "Pipfile", "poetry.lock"]
_loaded_files = {}


def find_project_root(entry_path):
    current = os.path.dirname(entry_path)
    for _ in range(5):
        if any(os.path.exists(os.path.join(current, marker)) for marker in PROJECT_INDICATORS):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return os.path.dirname(entry_path)


def load_entry_file(entry_path):
    import importlib.util

    if entry_path in _loaded_files:
        return _loaded_files[entry_path]
    if not os.path.exists(entry_path):
        raise FileNotFoundError(f"Entry point file not found: {entry_path}")
    if not entry_path.endswith(".py"):
        raise ValueError(f"Entry point must be a Python file: {entry_path}")
    root = find_project_root(entry_path)
    root_parent = os.path.dirname(root)
    for p in (root_parent, root, os.path.dirname(entry_path)):
        if p not in sys.path:
            sys.path.insert(0, p)
    rel = os.path.relpath(entry_path, root_parent)
    if rel.startswith(".."):
        module_name = f"entrypoint_{os.path.basename(entry_path)[:-3]}"
    else:
        module_name = rel[:-3].replace(os.sep, ".")
    if "." in module_name:  # so that relative imports inside the entry file resolve
        try:
            import importlib
            importlib.import_module(module_name.rsplit(".", 1)[0])
        except Exception:
            pass
    spec = importlib.util.spec_from_file_location(module_name, str(entry_path))
    if not spec or not spec.loader:
        raise ImportError(f"Could not create spec for {entry_path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    _loaded_files[entry_path] = module
    return module


def resolve_target(module, dotted):
    first, *rest = dotted.split(".")
    if not hasattr(module, first):
        available = [n for n in dir(module) if not n.startswith("_")]
        raise AttributeError(f"Object '{first}' not found in {module.__file__}. Available objects: {available}")
    target = getattr(module, first)
    for part in rest:
        target = getattr(target, part)
    return target


# --------------------------------------------------------------------------------------------
# Parameter schemas from signatures and type hints
# --------------------------------------------------------------------------------------------

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
           type(None): "null", bytes: "string"}


def hint_schema(hint):
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return {}
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        non_null = [a for a in args if a is not type(None)]
        parts = [hint_schema(a) for a in non_null]
        if len(args) != len(non_null):
            parts.append({"type": "null"})
        return {"anyOf": parts} if len(parts) > 1 else (parts[0] if parts else {})
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set):
        schema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            item = hint_schema(args[0])
            if item:
                schema["items"] = item
        return schema
    if origin in (dict, collections.abc.Mapping):
        schema = {"type": "object"}
        if len(args) == 2:
            value = hint_schema(args[1])
            if value:
                schema["additionalProperties"] = value
        return schema
    if origin is typing.Literal:
        return {"enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, str):
        return {"type": "string"}
    return {}


def _json_default(value):
    try:
        json.dumps(value, allow_nan=False)
        return True, value
    except Exception:
        return False, None


def describe(target):
    """JSON Schema of the call's keyword arguments, plus what the docs need."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {"type": "object", "additionalProperties": True}, [], True, True, None
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = getattr(target, "__annotations__", {}) or {}
    props, required, order = {}, [], []
    var_args = var_kwargs = False
    context = None
    for name, p in sig.parameters.items():
        if context is None and is_context_param(name, p, hints) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            context = name
            continue
        if p.kind == p.VAR_POSITIONAL:
            var_args = True
            continue
        if p.kind == p.VAR_KEYWORD:
            var_kwargs = True
            continue
        if p.kind == p.POSITIONAL_ONLY:
            order.append(name)
            continue
        schema = dict(hint_schema(hints.get(name, p.annotation)))
        if p.default is p.empty:
            required.append(name)
        else:
            ok, value = _json_default(p.default)
            if ok:
                schema["default"] = value
        props[name] = schema
        if p.kind == p.POSITIONAL_OR_KEYWORD:  # keyword-only parameters take no positional value
            order.append(name)
    schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = bool(var_kwargs)
    return schema, order, var_args, var_kwargs, context


def is_context_param(name, p, hints):
    """The run context goes to a parameter named `ctx`, or one annotated with `RunContext`."""
    hint = hints.get(name, p.annotation)
    hint_name = hint if isinstance(hint, str) else getattr(hint, "__name__", "")
    return name == "ctx" or hint_name == "RunContext"


def function_kind(target):
    fn = target
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and callable(fn):
        call = getattr(type(fn), "__call__", None)
        if call is not None and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
            fn = call
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "function"


_NOT_ITERABLE = (int, float, bool, type(None), complex)


def check_streamable(target, kind, name):
    """A `_stream` entrypoint must be a generator or return an iterable. Plain functions are only
    known at call time, unless their return annotation says they cannot stream."""
    if kind in ("generator", "asyncgen"):
        return
    try:
        ret = typing.get_type_hints(target).get("return", inspect.Signature.empty)
    except Exception:
        ret = inspect.signature(target).return_annotation if callable(target) else inspect.Signature.empty
    if ret is None:
        ret = type(None)
    if isinstance(ret, type) and issubclass(ret, _NOT_ITERABLE):
        raise TypeError(f"'{name}' is a {kind} returning {ret.__name__}, so it cannot stream: an entrypoint whose "
                        f"tag ends in `_stream` must be a generator or return an iterable")


def user_traceback(exc):
    """The traceback without the shim's and importlib's own frames: users debug their code."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen importlib._bootstrap>",
                                                                   "<frozen importlib._bootstrap_external>")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class CancelledError(Exception):
    """The server cancelled the call (its client went away, or its deadline passed)."""


class NonRetriableError(Exception):
    """Raised by an agent (as `ctx.NonRetriableError`), fails a durable run without retries. Any
    exception with a `retriable = False` attribute does the same."""

    retriable = False


class CheckpointNotSaved(Exception):
    """The server could not save a checkpoint: the run lost its lease or is being cancelled."""


class _RunLog:
    __slots__ = ("ctx",)
    _LEVELS = {"debug": b"d", "info": b"i", "warning": b"w", "error": b"e"}

    def __init__(self, ctx):
        self.ctx = ctx

    def __call__(self, message, level="info"):
        ctx = self.ctx
        text = str(message)
        if not ctx._durable:
            sys.stderr.write(f"[{level}] {text}\n")
            return
        body = self._LEVELS.get(level, b"i") + text.encode("utf-8", "backslashreplace")
        ctx._worker.send_frame(_ID.pack(len(body) + 5, b"L", ctx._rid) + body)
        ctx._worker.spend_credit(ctx._flow, ctx._on_loop)

    def debug(self, message):
        self(message, "debug")

    def info(self, message):
        self(message, "info")

    def warning(self, message):
        self(message, "warning")

    def error(self, message):
        self(message, "error")


class RunContext:
    """What a durable run's entrypoint gets as `ctx`: its identity, its last checkpoint, and the
    means to report progress. Outside a durable run (a plain invocation) it is inert: run_id is
    None, emit and checkpoint do nothing durable, log goes to the server's log."""

    NonRetriableError = NonRetriableError
    CheckpointNotSaved = CheckpointNotSaved

    def __init__(self, worker, rid, run, flow=None, on_loop=False):
        self._worker = worker
        self._rid = rid
        self._durable = run is not None
        self._on_loop = on_loop
        # The run's window (a StreamState), shared with its chunks: events and logs use it up
        # too, so an agent that floods them waits for the server instead of filling its memory.
        self._flow = flow
        run = run or {}
        self.run_id = run.get("id")
        self.attempt = run.get("attempt", 1)
        self.state = run.get("state")
        self._cancelled = False
        self._ack = None
        self.log = _RunLog(self)

    @property
    def cancelled(self):
        """True once the run was asked to stop. Long sync loops should check it."""
        if not self._cancelled and self._durable:
            self._worker.poll_control(block=False)
            self._worker.kick()
        return self._cancelled

    def emit(self, kind, data=None):
        """Appends a custom event `kind` (not starting with "run.") to the run's log."""
        if (not isinstance(kind, str) or not kind or kind.startswith("run.") or len(kind) > 200
                or not kind.isprintable()):
            raise ValueError("an event kind is a non-empty string of at most 200 printable characters "
                             "(no newlines), not starting with 'run.'")
        if not self._durable:
            return
        _, payload = encode_value(data)
        k = kind.encode("utf-8", "backslashreplace")
        self._worker.send_frame(_EMIT.pack(len(payload) + len(k) + 7, b"V", self._rid, len(k)) + k + payload)
        self._worker.spend_credit(self._flow, self._on_loop)

    def checkpoint(self, state):
        """Saves `state` (JSON-serialisable); a later attempt of this run starts with it as
        `ctx.state`. Returns once it is committed."""
        _, payload = encode_value(state)
        self.state = state
        if not self._durable:
            return
        worker = self._worker
        self._ack = None
        worker.send_frame(_ID.pack(len(payload) + 5, b"K", self._rid) + payload)
        while self._ack is None:
            worker.poll_control(block=True)
        worker.kick()
        if not self._ack:
            raise CheckpointNotSaved("the checkpoint was not saved: the run lost its lease or is being cancelled")


class Entrypoint:
    __slots__ = ("tag", "target", "kind", "stream", "extractor", "context")

    def __init__(self, tag, target, kind, stream, extractor, context):
        self.tag, self.target, self.kind, self.stream, self.extractor = tag, target, kind, stream, extractor
        self.context = context


def load_entrypoints(spec):
    """Imports every entrypoint; returns (entrypoints by tag, reports for the hello, errors)."""
    agent_dir = spec["agent_dir"]
    entrypoints, reports, errors = {}, [], []
    for ep in spec["entrypoints"]:
        tag = ep["tag"]
        where = f"{ep['file']}:{ep['module']}"
        try:
            module = load_entry_file(os.path.realpath(os.path.join(agent_dir, ep["file"])))
            target = resolve_target(module, ep["module"])
            if not callable(target):
                raise TypeError(f"'{ep['module']}' in {ep['file']} is {type(target).__name__}, not callable")
            kind = function_kind(target)
            stream = tag.endswith("_stream")
            if stream:
                check_streamable(target, kind, ep["module"])
            schema, positional, var_args, var_kwargs, context = describe(target)
            doc = inspect.getdoc(target)
            entrypoints[tag] = Entrypoint(tag, target, kind, stream, ep.get("extractor") or {}, context)
            reports.append({"tag": tag, "kind": kind, "stream": stream, "schema": schema, "doc": doc,
                            "positional_only": positional, "var_args": var_args, "var_kwargs": var_kwargs,
                            "context": context})
        except BaseException as e:  # noqa: BLE001 - import errors of user code are reported, not raised
            if isinstance(e, (KeyboardInterrupt,)):
                raise
            errors.append({"tag": tag, "where": where, "type": type(e).__name__, "message": str(e),
                           "traceback": user_traceback(e)})
    return entrypoints, reports, errors


# --------------------------------------------------------------------------------------------
# The protocol loop
# --------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, sock, entrypoints):
        self.sock = sock
        self.entrypoints = entrypoints
        self.rbuf = bytearray()
        self.rview = memoryview(bytearray(262144))  # reused: a fresh 256 KiB buffer per read costs an mmap
        self.out = []
        self.loop = None
        self.streams = {}  # id -> StreamState (credits, cancelled, event)
        self.tasks = {}  # id -> asyncio task
        self.pending = collections.deque()  # calls read but not started yet
        self.idle = None  # asyncio.Event, set when the last async call ends
        self.cancelled = set()  # ids cancelled before they started
        self.contexts = {}  # id -> RunContext of calls that take one

    # -- writing ---------------------------------------------------------------------------
    def send_now(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            self.shutdown()

    def send_frame(self, frame):
        """Sends a context frame now, after anything buffered (order matters to the run's log)."""
        self.out.append(frame)
        self.flush()

    def spend_credit(self, state, on_loop):
        """A run's event or log line uses up one unit of its window; when none is left, waits
        for the server's grant reading the socket, as a checkpoint waits for its ack. Without a
        window (a server that gives none) nothing is counted.

        Waiting blocks the thread that reads the socket, so it is done only there, and for a
        call on the event loop (an async entrypoint, whose worker other calls share) only past
        an overdraft of `_OVERDRAFT` windows: while the server keeps up, the loop never stops.
        Another thread never reads the socket: it overdraws (the run's event caps still hold).
        A cancelled run out of credit gets CancelledError, as its chunks do."""
        if state is None:
            return
        state.credits -= 1
        if state.credits > 0:
            return
        if state.cancelled:
            raise CancelledError()
        if threading.current_thread() is not threading.main_thread():
            return
        if on_loop and state.credits > -_OVERDRAFT * state.window:
            return
        while state.credits <= 0 and not state.cancelled:
            self.poll_control(block=True)
        self.kick()
        if state.cancelled:
            raise CancelledError()

    def kick(self):
        """Frames read while an async call polled the socket wait in `pending`: run them soon."""
        if self.pending and self.loop is not None and self.loop.is_running():
            self.loop.call_soon(self.on_readable)

    def flush(self):
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.send_now(data)

    def result(self, rid, value, ep):
        if ep.extractor:
            value = apply_extractor(ep.extractor, value)
        code, payload = encode_value(value)
        self.contexts.pop(rid, None)
        self.streams.pop(rid, None)
        self.out.append(_ID_TYPE.pack(len(payload) + 6, b"R", rid, code) + payload)

    def failure(self, rid, exc, cancelled=False):
        self.contexts.pop(rid, None)
        self.streams.pop(rid, None)
        retriable = getattr(exc, "retriable", True) is not False
        body = json.dumps({"type": type(exc).__name__, "message": str(exc),
                           "traceback": user_traceback(exc),
                           "cancelled": cancelled, "retriable": retriable},
                          ensure_ascii=False).encode("utf-8", "backslashreplace")
        self.out.append(_ID.pack(len(body) + 5, b"F", rid) + body)

    def chunk_frame(self, rid, value, ep):
        if ep.extractor:
            value = apply_extractor(ep.extractor, value)
        code, payload = encode_value(value)
        return _ID_TYPE.pack(len(payload) + 6, b"D", rid, code) + payload

    def end(self, rid, count):
        self.contexts.pop(rid, None)
        self.out.append(_END.pack(9, b"E", rid, count))

    # -- reading ---------------------------------------------------------------------------
    def read_frames(self, block):
        """Reads what is available (waiting for something if `block`); returns whole frames."""
        try:
            n = self.sock.recv_into(self.rview, 0, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except (ConnectionResetError, OSError):
            n = 0
        if n == 0:
            self.shutdown()
        buf = self.rbuf
        buf += self.rview[:n]
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _HDR.unpack_from(buf, pos)
            if length > MAX_FRAME or length == 0:
                sys.stderr.write(f"agentry worker: bad frame length {length}, exiting\n")
                self.shutdown()
            if end - pos - 4 < length:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + length]))
            pos += 4 + length
        del buf[:pos]
        return frames

    def shutdown(self):
        # The server closed the socket (or died): nothing is left to do for anyone.
        os._exit(0)

    def serve(self):
        """The main loop. Sync calls run straight from a blocking read (no event loop in the
        way); while async calls are in flight, asyncio drives both them and the socket."""
        fd = self.sock.fileno()
        while True:
            if self.tasks:
                self.loop.add_reader(fd, self.on_readable)
                self.loop.run_until_complete(self.until_no_tasks())
                self.loop.remove_reader(fd)
            else:
                self.on_readable(block=True)

    async def until_no_tasks(self):
        while self.tasks:
            self.idle.clear()
            await self.idle.wait()

    def on_readable(self, block=False):
        """Runs every call that has arrived, then answers them all in one write. After a slow
        call, its answer goes out at once and new control frames (cancels) are read before the
        next queued call starts."""
        pending = self.pending
        if not pending:
            pending.extend(self.read_frames(block))
        while pending:
            frame = pending.popleft()
            started = _clock()
            self.handle(frame)
            if _clock() - started > 0.001 and pending:
                self.flush()
                self.poll_control(block=False)
        self.flush()

    def handle(self, frame):
        kind = frame[0:1]
        (rid,) = struct.unpack_from(">I", frame, 1)
        if kind == b"C":
            self.start_call(rid, json.loads(frame[5:]))
        elif kind == b"X":
            state = self.streams.get(rid)
            task = self.tasks.get(rid)
            ctx = self.contexts.get(rid)
            if ctx is not None:
                ctx._cancelled = True
            if state is not None:
                state.cancel()
            if task is not None:
                task.cancel()
            if state is None and task is None and ctx is None:
                self.cancelled.add(rid)
        elif kind == b"A":
            ctx = self.contexts.get(rid)
            if ctx is not None:
                ctx._ack = frame[5:6] == b"\x01"
        elif kind == b"Q":
            os._exit(0)
        elif kind == b"W":
            (n,) = struct.unpack_from(">I", frame, 5)
            state = self.streams.get(rid)
            if state is not None:
                state.grant(n)

    def start_call(self, rid, call):
        if rid in self.cancelled:  # its deadline passed while it waited behind another call
            self.cancelled.discard(rid)
            self.failure(rid, CancelledError(), cancelled=True)
            return
        ep = self.entrypoints.get(call["e"])
        args = call.get("a", [])
        kwargs = call.get("k", {})
        if ep is None:
            self.failure(rid, LookupError(f"Entrypoint {call['e']} not found"))
            return
        # A stream's window bounds its chunks; a durable run's (streaming or not) also bounds its
        # events and log lines. Grants and cancels reach it through `streams`.
        state = None
        if ep.stream:
            state = StreamState(call.get("w") or 64)
        elif call.get("r") is not None and call.get("w"):
            state = StreamState(call["w"])
        if state is not None:
            self.streams[rid] = state
        if ep.context is not None:
            ctx = RunContext(self, rid, call.get("r"), state if call.get("r") is not None else None,
                             on_loop=ep.kind in ("coroutine", "asyncgen"))
            self.contexts[rid] = ctx
            kwargs[ep.context] = ctx
        if not ep.stream:
            if ep.kind == "coroutine":
                self.tasks[rid] = self.loop.create_task(self.run_coroutine(rid, ep, args, kwargs))
                return
            try:
                value = ep.target(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the agent's exception goes back to the caller
                if isinstance(e, SystemExit):
                    self.flush_and_exit(rid, e)
                self.failure(rid, e, cancelled=isinstance(e, CancelledError))
                return
            self.result(rid, value, ep)
            return
        if ep.kind in ("asyncgen", "coroutine"):
            self.tasks[rid] = self.loop.create_task(self.run_async_stream(rid, ep, args, kwargs, state))
        else:
            self.run_sync_stream(rid, ep, args, kwargs, state)

    def flush_and_exit(self, rid, exc):
        self.failure(rid, exc)
        self.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)

    async def run_coroutine(self, rid, ep, args, kwargs):
        try:
            value = await ep.target(*args, **kwargs)
            self.result(rid, value, ep)
        except (CancelledError, asyncio.CancelledError) as e:
            self.failure(rid, e, cancelled=True)
        except BaseException as e:  # noqa: BLE001
            self.failure(rid, e)
        finally:
            self.task_done(rid)

    def task_done(self, rid):
        self.tasks.pop(rid, None)
        self.flush()
        if not self.tasks and self.idle is not None:
            self.idle.set()

    # -- streams ---------------------------------------------------------------------------
    def run_sync_stream(self, rid, ep, args, kwargs, state):
        """Iterates a sync generator (or a function returning an iterable) on this thread.

        The worker runs only this call meanwhile, so blocking here blocks nobody else. Between
        chunks it reads the socket without waiting, to see cancel frames and credit grants, and it
        waits for credit when the server's window is used up (backpressure).
        """
        count = 0
        iterator = None
        try:
            iterator = iter(ep.target(*args, **kwargs))
            for value in iterator:
                frame = self.chunk_frame(rid, value, ep)
                count += 1
                self.out.append(frame)
                self.flush()
                if count == 1:
                    os.sched_yield()
                state.credits -= 1
                self.poll_control(block=False)
                while state.credits <= 0 and not state.cancelled:
                    self.poll_control(block=True)
                if state.cancelled:
                    raise CancelledError()
            self.end(rid, count)
        except CancelledError as e:
            self.failure(rid, e, cancelled=True)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, SystemExit):
                self.flush_and_exit(rid, e)
            self.failure(rid, e)
        finally:
            if iterator is not None and hasattr(iterator, "close"):
                try:
                    iterator.close()
                except BaseException:  # noqa: BLE001
                    pass
            self.streams.pop(rid, None)
            self.flush()

    def poll_control(self, block):
        """Reads what has arrived: control frames act now, calls wait their turn."""
        for frame in self.read_frames(block=block):
            if frame[0:1] in (b"X", b"W", b"Q", b"A"):
                self.handle(frame)
            else:
                self.pending.append(frame)

    async def send_chunk(self, rid, value, ep, state):
        """Sends one chunk, then waits while the stream has no credit left."""
        self.out.append(self.chunk_frame(rid, value, ep))
        self.flush()
        state.credits -= 1
        while state.credits <= 0 and not state.cancelled:
            await state.wait()
        if state.cancelled:
            raise CancelledError()

    async def run_async_stream(self, rid, ep, args, kwargs, state):
        count = 0
        agen = None
        try:
            result = ep.target(*args, **kwargs)
            if inspect.isawaitable(result) and not hasattr(result, "__aiter__"):
                result = await result
            if hasattr(result, "__aiter__"):
                agen = result
                async for value in result:
                    count += 1
                    await self.send_chunk(rid, value, ep, state)
                    await asyncio.sleep(0)  # let other calls on this worker run between chunks
            else:
                for value in result:
                    count += 1
                    await self.send_chunk(rid, value, ep, state)
            self.end(rid, count)
        except (CancelledError, asyncio.CancelledError) as e:
            self.failure(rid, e, cancelled=True)
        except BaseException as e:  # noqa: BLE001
            self.failure(rid, e)
        finally:
            if agen is not None and hasattr(agen, "aclose"):
                try:
                    await agen.aclose()
                except BaseException:  # noqa: BLE001
                    pass
            self.streams.pop(rid, None)
            self.task_done(rid)


# How many windows a call on the event loop may run ahead before `spend_credit` blocks the loop.
_OVERDRAFT = 4


class StreamState:
    __slots__ = ("credits", "cancelled", "event", "window")

    def __init__(self, window):
        self.window = window
        self.credits = window
        self.cancelled = False
        self.event = None

    def grant(self, n):
        self.credits += n
        if self.event is not None:
            self.event.set()

    def cancel(self):
        self.cancelled = True
        if self.event is not None:
            self.event.set()

    async def wait(self):
        if self.event is None:
            self.event = asyncio.Event()
        self.event.clear()
        await self.event.wait()


def _die_with_parent(parent):
    """The server is gone: take down this worker's process group (it leads it), so that what the
    agent spawned dies too. The kernel sends SIGUSR2 when the server dies (PR_SET_PDEATHSIG);
    a thread also checks, in case the signal came before the handler was installed."""
    import signal
    import threading

    def die(*_):
        try:
            os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(1)

    signal.signal(signal.SIGUSR2, die)
    # A process the agent forks is not the worker: it must not take the worker's group down
    # if it gets a SIGUSR2 of its own.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGUSR2, signal.SIG_DFL))
    if os.getppid() != parent:
        die()

    def watch():
        import time
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                die()

    threading.Thread(target=watch, name="agentry-parent-watch", daemon=True).start()


def main():
    parent = int(os.environ.pop("AGENTRY_PARENT_PID", "0") or 0)
    if parent:
        _die_with_parent(parent)
    fd = int(os.environ.get("AGENTRY_FD", "3"))
    sock = socket.socket(fileno=fd)
    spec = json.loads(os.environ["AGENTRY_SPEC"])
    os.environ.pop("AGENTRY_SPEC", None)
    entrypoints, reports, errors = load_entrypoints(spec)
    hello = json.dumps({"protocol": PROTOCOL_VERSION, "pid": os.getpid(), "python": sys.version.split()[0],
                        "executable": sys.executable, "entrypoints": reports, "errors": errors},
                       ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")
    sock.sendall(_HDR.pack(len(hello) + 1) + b"H" + hello)
    if errors:
        # The server reports the errors and decides; a worker with broken entrypoints never serves.
        sock.close()
        return
    worker = Worker(sock, entrypoints)
    if any(ep.kind in ("coroutine", "asyncgen") for ep in entrypoints.values()):
        # Only agents with async entrypoints pay for importing asyncio (tens of milliseconds).
        global asyncio
        import asyncio
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        worker.loop = loop
        worker.idle = asyncio.Event()
    worker.serve()


if __name__ == "__main__":
    main()
