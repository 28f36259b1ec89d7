"""What crosses the pipes to and from a process worker: framing, and pickles of the
ops (dataclasses as positional tuples; a decode step's ``ExecuteOp`` as plain tuples)."""

from __future__ import annotations

import copyreg
import dataclasses
import io
import logging
import operator
import os
import pickle
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec, SamplerSpec
from loom.engine.worker.pipe_reader import FRAME_LENGTH

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


from loom.engine.worker.ops import _PICKLE, ChunkStep, ExecuteOp, GenPlan

logger = logging.getLogger(__name__)

# Parent -> child: a header (kind byte, id) and the payload; an op travels as its own
# pickle, so an op the child cannot unpickle still fails as that op instead of losing its
# id. (A pickled ``(kind, id, payload)`` tuple cost a second pickling and a copy per op.)
_OP, _STATS, _CLOSE = b"o", b"s", b"c"
_EXECUTE = b"x"  # an ExecuteOp without plans or sends, in the compact form below
_HEADER = struct.Struct("<cQ")
# Messages under this size are framed here (``FRAME_LENGTH``) and written in one call.
_SMALL_MESSAGE = 1 << 16


def _write_message(conn: Connection, fd: int, kind: bytes, ident: int, payload: bytes) -> None:
    """Write what ``conn.send_bytes(header + payload)`` writes (``fd`` is its descriptor).

    A small message (a decode step's op) is framed here and written with one system
    call: ``send_bytes`` runs five Python functions per op on the runtime thread."""
    if len(payload) >= _SMALL_MESSAGE:
        conn.send_bytes(_HEADER.pack(kind, ident) + payload)
        return
    msg = FRAME_LENGTH.pack(_HEADER.size + len(payload)) + _HEADER.pack(kind, ident) + payload
    sent = os.write(fd, msg)
    while sent < len(msg):  # a blocking pipe takes it all, barring signals
        sent += os.write(fd, msg[sent:])


def _positional_reducer(cls: type) -> Callable[[Any], tuple[type, tuple[Any, ...]]]:
    """Pickle a dataclass instance as ``cls(*fields)``.

    The default for slots dataclasses goes through their Python ``__getstate__`` /
    ``__setstate__`` (field by field, ``object.__setattr__`` for frozen ones): for a
    32-sequence decode op that is ~3x slower than one constructor call per object.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    assert len(fields) > 1 and all(f.init for f in dataclasses.fields(cls))
    get = operator.attrgetter(*fields)  # several names: returns the tuple, in C
    return lambda obj: (cls, get(obj))


_WIRE_REDUCERS: dict[type, Callable[[Any], Any]] = {
    **copyreg.dispatch_table,
    **{
        cls: _positional_reducer(cls)
        for cls in (
            ForwardBatch,
            OutputSpec,
            SamplerSpec,
            OutputResult,
            ExecuteOp,
            GenPlan,
            ChunkStep,
        )
    },
}


def _dumps(obj: object) -> bytes:
    """Pickle what crosses the pipes (plain ``pickle.loads`` reads it back)."""
    return _WirePickler().dumps(obj)


class _WirePickler:
    """``_dumps`` with one pickler kept for a sender's every message (a new pickler and
    buffer per op showed up in the per-step cost of a single decode step). Not
    thread-safe: one per sender, used under its send lock."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._pickler = pickle.Pickler(self._buf, protocol=_PICKLE)
        self._pickler.dispatch_table = _WIRE_REDUCERS

    def dumps(self, obj: object) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        self._pickler.clear_memo()  # each message stands alone
        self._pickler.dump(obj)
        return buf.getvalue()


# Every field of ``OutputSpec``, in order (``test_the_wire_keeps_every_output_field``).
_OUTPUT_FIELDS = operator.attrgetter(
    "index", "sampler", "top_k_dist", "logprobs", "logit_mask", "logit_bias", "state"
)
_SAMPLER_FIELDS = operator.attrgetter("temperature", "top_k", "top_p", "min_p", "seed")


def _encode_execute(op: ExecuteOp) -> bytes:
    """A decode step's op as plain tuples and lists, pickled by C alone: the dataclass
    reducers cost a Python call per object, ~4x the time for a one-sequence op, and this
    is paid on the runtime thread for every batch."""
    b = op.batch
    outputs = [(i, None if s is None else _SAMPLER_FIELDS(s), k, lp, mask, bias, state)
               for i, s, k, lp, mask, bias, state in map(_OUTPUT_FIELDS, b.outputs)]  # fmt: skip
    wire = (b.token_ids, b.positions, b.seq_indptr, b.page_tables, b.last_page_lens, outputs,
            b.masks, op.fresh_pages, op.chain)  # fmt: skip
    return pickle.dumps(wire, protocol=_PICKLE)


def _decode_execute(payload: bytes | memoryview) -> ExecuteOp:
    """The ``ExecuteOp`` that ``_encode_execute`` wrote (in the worker)."""
    tokens, positions, indptr, tables, lasts, wire_outputs, masks, fresh, chain = pickle.loads(
        payload
    )
    samplers: dict[tuple[Any, ...], SamplerSpec] = {}
    outputs = []
    for i, s, k, lp, mask, bias, state in wire_outputs:
        sampler = None
        if s is not None:
            sampler = samplers.get(s)
            if sampler is None:
                sampler = samplers[s] = SamplerSpec(*s)
        outputs.append(OutputSpec(i, sampler, k, lp, mask, bias, state))
    batch = ForwardBatch(tokens, positions, indptr, tables, lasts, outputs, masks)
    return ExecuteOp(batch, fresh, [], [], chain)
