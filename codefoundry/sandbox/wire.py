"""Values and calls crossing between a sandboxed program and its checker.

Both sides of :mod:`launcher`'s checked jobs use this module (standard library
only, loaded by the launcher from its own directory). Messages are JSON lines; values are
JSON with tags: None, bool, int, float and str are themselves and a list is an array; any
other value is an object with one key naming its type. Decoding builds genuine builtin (or
standard library, or numpy) objects, so the checker's comparisons use their own methods.
Whatever is not plain data stays in the program's process; the checker holds a
:class:`Remote` handle to it, through which it can call it, read and set attributes and
iterate, and which compares by identity.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import json
import os
import sys

MAX_MESSAGE_BYTES = 64 << 20  # one value crossing from the program to the checker


def describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = type(exc).__name__
    return text[:300]


class ProgramExit(BaseException):
    """The program's function called sys.exit (or was interrupted) during the test."""


class ProgramGone(BaseException):
    """The program's process ended or closed its channel during the test."""


class ProtocolError(BaseException):
    """The program's process sent something that is not a well-formed reply."""


# JSON with tags: None, bool, int, float and str are themselves and a list is an array; any
# other value is an object with one key naming its type. Decoding builds genuine builtin
# (or standard library) objects, so the checker's comparisons use their own methods.

_MAPPINGS = {"d": dict, "od": collections.OrderedDict, "cn": collections.Counter}
_SEQUENCES = {"t": tuple, "s": set, "fs": frozenset, "dq": collections.deque}
_MAPPING_TAGS = {cls: tag for tag, cls in _MAPPINGS.items()}
_SEQUENCE_TAGS = {cls: tag for tag, cls in _SEQUENCES.items()}
_EXCEPTIONS = {name: cls for name, cls in vars(builtins).items() if isinstance(cls, type) and issubclass(cls, Exception)}


def encode(value, handle) -> object:
    """``value`` as tagged JSON; ``handle(obj)`` stands in for anything that is not plain data
    (the program passes it a handle registry, the checker a function that refuses)."""
    kind = type(value)
    if value is None or kind in (bool, str, float):
        return value
    if kind is int:
        return value if value.bit_length() <= 8000 else {"i": hex(value)}  # JSON digits are capped
    if kind is list:
        return [encode(v, handle) for v in value]
    if kind in _SEQUENCE_TAGS:
        return {_SEQUENCE_TAGS[kind]: [encode(v, handle) for v in value]}
    if kind in _MAPPING_TAGS:
        return {_MAPPING_TAGS[kind]: [[encode(k, handle), encode(v, handle)] for k, v in value.items()]}
    if kind is collections.defaultdict:
        return {"d": [[encode(k, handle), encode(v, handle)] for k, v in value.items()]}
    if kind in (bytes, bytearray):
        return {"b" if kind is bytes else "ba": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if kind is _loaded_class("decimal", "Decimal"):
        return {"dec": str(value)}
    if kind is _loaded_class("fractions", "Fraction"):
        return {"fr": [encode(value.numerator, handle), encode(value.denominator, handle)]}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)) and value.dtype.kind in NUMPY_KINDS:
        return {"npa" if isinstance(value, numpy.ndarray) else "nps":
                [value.dtype.str, list(value.shape), encode(value.tolist(), handle)]}
    for base, copy in _BASE_COPIES:
        if isinstance(value, base):  # a subclass travels as its base type; its own methods stay behind
            return encode(copy(value), handle)
    return {"h": handle(value)}


# How to take the builtin value out of an instance of a subclass, without its overrides.
_BASE_COPIES = ((int, int.__int__), (float, float.__float__), (complex, complex.__complex__), (str, str.__str__),
                (bytes, bytes), (tuple, tuple), (list, list), (dict, dict), (set, set), (frozenset, frozenset))
NUMPY_KINDS = "biufcSU"  # numpy values that cross as arrays/scalars: bool, numbers, strings


def _loaded_class(module: str, name: str) -> type | None:
    """A class of a module if it is imported (no value can be of it otherwise): the program
    process does not pay for importing decimal and fractions."""
    return getattr(sys.modules.get(module), name, None)


def decode(data, handle, module=None) -> object:
    """Rebuild a value from :func:`encode`'s form; ProtocolError for anything else.
    ``handle(id)`` and ``module(name)`` rebuild handles and modules."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, handle, module) for v in data]
    if kind is not dict or len(data) != 1:
        raise ProtocolError(f"unexpected value of type {kind.__name__}")
    (tag, body), = data.items()
    try:
        if tag in _SEQUENCES and type(body) is list:
            return _SEQUENCES[tag](decode(v, handle, module) for v in body)
        if tag in _MAPPINGS and type(body) is list:
            pairs = {decode(k, handle, module): decode(v, handle, module) for k, v in body}
            return _MAPPINGS[tag](pairs)  # from a dict: Counter(pairs) would count the pairs
        if tag == "i" and type(body) is str:
            return int(body, 16)
        if tag in ("b", "ba") and type(body) is str:
            return (bytes if tag == "b" else bytearray).fromhex(body)
        if tag == "c" and type(body) is list and all(type(x) is float for x in body):
            return complex(*body)
        if tag == "dec" and type(body) is str:
            return importlib.import_module("decimal").Decimal(body)
        if tag == "fr" and type(body) is list and len(body) == 2:
            return importlib.import_module("fractions").Fraction(*(decode(v, handle, module) for v in body))
        if tag in ("npa", "nps") and type(body) is list and len(body) == 3:
            numpy = sys.modules["numpy"]
            dtype = numpy.dtype(body[0])
            if dtype.kind not in NUMPY_KINDS:
                raise ProtocolError(f"numpy dtype {dtype} does not cross")
            array = numpy.array(decode(body[2], handle, module), dtype=dtype).reshape(body[1])
            return array if tag == "npa" else array[()]
        if tag == "h" and type(body) is int:
            return handle(body)
        if tag == "m" and type(body) is str and module is not None:
            return module(body)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - unhashable keys, bad numbers, wrong arity
        raise ProtocolError(f"malformed {tag!r} value: {describe(exc)}") from None
    raise ProtocolError(f"unknown value tag {tag!r}")


def send(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


class Channel:
    """JSON lines over a pair of pipes."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = os.fdopen(read_fd, "rb")
        self.write_fd = write_fd

    def send(self, message: dict) -> None:
        try:
            send(self.write_fd, message)
        except BrokenPipeError:
            raise ProgramGone("the program's process stopped reading") from None

    def receive(self) -> dict:
        line = self.reader.readline(MAX_MESSAGE_BYTES + 1)
        if not line:
            raise ProgramGone("the program's process ended during the test")
        if not line.endswith(b"\n"):
            raise ProtocolError(f"a message over {MAX_MESSAGE_BYTES} bytes")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"malformed message: {describe(exc)}") from None
        if type(message) is not dict:
            raise ProtocolError("a message that is not an object")
        return message


# ---- the program's side ------------------------------------------------------------------

class Handles:
    """Objects of the program that the checker refers to by number."""

    def __init__(self) -> None:
        self.objects: list = []
        self.ids: dict[int, int] = {}

    def __call__(self, obj) -> int:
        key = id(obj)
        if key not in self.ids:
            self.ids[key] = len(self.objects)
            self.objects.append(obj)
        return self.ids[key]

    def get(self, ref: int):
        return self.objects[ref]


def encode_global(value, handles: Handles) -> object:
    if type(value) is type(sys):
        return {"m": value.__name__}
    try:
        return encode(value, handles)
    except RecursionError:
        return {"h": handles(value)}


OPERATIONS = {
    "call": lambda target, args, kwargs: target(*args, **kwargs),
    "getattr": lambda target, args, kwargs: getattr(target, *args),
    "setattr": lambda target, args, kwargs: setattr(target, *args),
    "iter": lambda target, args, kwargs: list(target),
    "next": lambda target, args, kwargs: next(target),
    "len": lambda target, args, kwargs: len(target),
    "bool": lambda target, args, kwargs: bool(target),
    "getitem": lambda target, args, kwargs: target[args[0]],
    "contains": lambda target, args, kwargs: args[0] in target,
}


def serve_calls(channel: Channel, handles: Handles) -> None:
    """Answer the checker's operations on handles until it closes the channel."""
    while True:
        try:
            request = channel.receive()
        except ProgramGone:
            return
        try:
            args = decode(request["args"], handles.get)
            kwargs = dict(decode(request["kwargs"], handles.get))
            value = OPERATIONS[request["op"]](handles.get(request["ref"]), args, kwargs)
            reply = {"value": encode(value, handles), "args": [encode(a, handles) for a in args]}
        except BaseException as exc:  # noqa: BLE001 - goes back to the test as that exception
            base = next(cls.__name__ for cls in type(exc).__mro__ if vars(builtins).get(cls.__name__) is cls)
            try:
                args = encode(list(exc.args), _refuse)
            except BaseException:  # noqa: BLE001 - arguments that are not plain data, or a hostile exception
                args = [describe(exc)]
            reply = {"raise": base, "args": args, "detail": describe(exc)}
        channel.send(reply)


# ---- the checker's side ------------------------------------------------------------------

class Remote:
    """The checker's stand-in for an object that stays in the program's process. It supports
    calls, attributes, iteration, len, truth, indexing and ``in`` (each a round trip);
    equality and hashing are by identity, so the program's ``__eq__`` is never consulted."""

    __slots__ = ("_link", "_ref")

    def __init__(self, ref: int, link: Link) -> None:
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_link", link)

    def __call__(self, *args, **kwargs):
        return self._link.request("call", self, args, kwargs)

    def __getattr__(self, name: str):
        return self._link.request("getattr", self, (name,))

    def __setattr__(self, name: str, value) -> None:
        self._link.request("setattr", self, (name, value))

    def __iter__(self):
        return iter(self._link.request("iter", self))

    def __next__(self):
        return self._link.request("next", self)

    def __len__(self) -> int:
        return self._link.request("len", self)

    def __bool__(self) -> bool:
        return self._link.request("bool", self)

    def __getitem__(self, key):
        return self._link.request("getitem", self, (key,))

    def __contains__(self, key) -> bool:
        return self._link.request("contains", self, (key,))

    def __repr__(self) -> str:
        return f"<program object #{self._ref}>"


class Link:
    """The checker's side of the channel: requests on handles, replies rebuilt as values."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.remotes: dict[int, Remote] = {}

    def remote(self, ref: int) -> Remote:
        if ref not in self.remotes:
            self.remotes[ref] = Remote(ref, self)
        return self.remotes[ref]

    def _outgoing(self, value) -> int:
        if type(value) is Remote and value._link is self:
            return value._ref
        raise TypeError(f"the test passed a {type(value).__name__}, which cannot cross to the program")

    def request(self, op: str, target: Remote, args: tuple = (), kwargs: dict | None = None):
        self.channel.send({"op": op, "ref": target._ref, "args": encode(list(args), self._outgoing),
                           "kwargs": encode(kwargs or {}, self._outgoing)})
        reply = self.channel.receive()
        if "raise" in reply:
            raise _rebuilt_exception(reply.get("raise"), decode(reply.get("args", []), _refuse), reply.get("detail"))
        if "value" not in reply or type(reply.get("args")) is not list or len(reply["args"]) != len(args):
            raise ProtocolError("a reply without a value")
        for sent, after in zip(args, reply["args"]):  # the function may have changed its arguments
            _update_in_place(sent, decode(after, self.remote))
        return decode(reply["value"], self.remote)


def _update_in_place(sent, after) -> None:
    if type(sent) is list and type(after) is list:
        sent[:] = after
    elif type(sent) in (dict, set) and type(after) is type(sent):
        sent.clear()
        sent.update(after)
    elif type(sent) is bytearray and type(after) is bytearray:
        sent[:] = after


def _refuse(value) -> int:
    raise TypeError(f"a {type(value).__name__} is not plain data")


def _rebuilt_exception(name, args, detail) -> BaseException:
    """The checker's own exception for one raised in the program: its nearest builtin class,
    with its arguments when they are plain data."""
    detail = str(detail)[:300]
    if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        return ProgramExit(detail)
    if name == "MemoryError":
        return MemoryError(detail)
    try:
        return _EXCEPTIONS[name](*(args if type(args) is list else [detail]))
    except (KeyError, TypeError):  # not a builtin name, or arguments its constructor refuses
        return Exception(f"{name}: {detail}")


def trusted_module(name: str):
    """A module the program imported, imported by the checker itself (standard library or
    already loaded here), or None."""
    if name.partition(".")[0] in sys.stdlib_module_names or name in sys.modules:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - e.g. a module whose import needs what the guard disabled
            return None
    return None

