"""One generated ctypes callback per component host function.

Part of the wasmtime C-API layer with ``ffi`` and the codecs. Every guest call of
a host function enters Python through its callback, and right after the guest ran the
host's code and data are out of the CPU caches: each Python function entered and each
object touched then costs about a microsecond. A shared trampoline that looks the
function up, calls an argument-decoding closure, one decoder per argument, the function
and an encoder entered five to seven Python functions per call. Here the callback of each
host function is generated from its signature (``exec`` of a short source, the way
``dataclasses`` builds methods): scalar and resource arguments, and integer lists of one
element (a decode step's token and position), are read inline, other arguments call their
decoder, and a resource result is written inline.

Resource arguments (``borrow``/``own``) are converted with wasmtime's
``resource_any_to_host``; an ``own`` result reuses one host object per function with its
rep rewritten (``wasm_values.HOST_REP_OFFSET``), else makes and frees one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from ctypes import byref, c_void_p
from time import perf_counter
from typing import Any

from loom.runtime.wasm import values as wasm_values
from loom.runtime.wasm.decode import decoder
from loom.runtime.wasm.encode import encoder
from loom.runtime.wasm.hostcalls import HOST_LOCK

VAL = wasm_values.VAL_SIZE
PAYLOAD = wasm_values.PAYLOAD

SYNC_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p,
    ctypes.c_size_t,
)  # fmt: skip
ASYNC_CALLBACK = ctypes.CFUNCTYPE(
    None, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p, ctypes.c_size_t,
    c_void_p, c_void_p,
)  # fmt: skip


def _argument_lines(
    params: Sequence[Any], resource_ids: Callable[[str], int], ns: dict[str, Any]
) -> list[str]:
    """Statements reading argument ``i`` (at ``args + i * VAL``) into ``a<i>``."""
    lines = []
    for i, p in enumerate(params):
        at = i * VAL
        if p.kind in wasm_values.CTYPES:
            ns[f"_at{i}"] = wasm_values.CTYPES[p.kind].from_address
            lines.append(f"a{i} = _at{i}(args + {at + PAYLOAD}).value")
        elif p.kind in ("borrow", "own"):
            lines += [
                f"err = _to_host(ctx, _ptr_at(args + {at + PAYLOAD}).value, _host_ref)",
                "if err:",
                "    _resource_error(err, 'not a resource of this host')",
                f"a{i} = _host_rep(_host)",
                "_host_delete(_host)",
            ]
        elif p.kind == "list" and p.args[0].kind in ("u32", "s32", "u64", "s64"):
            # The decode step's lists hold one element: read it in place.
            ns[f"_dec{i}"] = decoder(p, resource_ids)
            ns[f"_at{i}"] = wasm_values.CTYPES[p.args[0].kind].from_address
            lines += [
                f"n = _ptr_at(args + {at + PAYLOAD}).value",
                "if n == 1:",
                f"    a{i} = [_at{i}(_ptr_at(args + {at + PAYLOAD + 8}).value + {PAYLOAD}).value]",
                "else:",
                f"    a{i} = _dec{i}(ctx, args + {at}) if n else []",
            ]
        else:
            ns[f"_dec{i}"] = decoder(p, resource_ids)
            lines.append(f"a{i} = _dec{i}(ctx, args + {at})")
    return lines


def _result_lines(result: Any, resource_ids: Callable[[str], int], ns: dict[str, Any]) -> list[str]:
    """Statements writing ``out`` to ``res``."""
    if result is None:
        return []
    if result.kind == "own" and wasm_values.HOST_REP_OFFSET is not None:
        host = wasm_values.host_new(True, 0, resource_ids(result.args[0]))
        ns["_own_rep"] = ctypes.c_uint32.from_address(host + wasm_values.HOST_REP_OFFSET)
        ns["_own_host"] = host
        return [
            "_own_rep.value = out",
            "err = _to_any(ctx, _own_host, _any_ref)",
            "if err:",
            "    _resource_error(err, 'could not hand a resource to the guest')",
            "_memmove(res, _pack_resource(_K_RESOURCE, _any.value or 0), 16)",
        ]
    ns["_enc"] = encoder(result, resource_ids)
    return ["_enc(ctx, out, res)"]


def _decode_and_call(
    params: Sequence[Any], resource_ids: Callable[[str], int], ns: dict[str, Any], target: str
) -> list[str]:
    """Lines decoding the arguments into ``a<i>``, then ``<target>_fn(ctx, a0, ...)``."""
    body = _argument_lines(params, resource_ids, ns)
    args = ", ".join(["ctx"] + [f"a{i}" for i in range(len(params))])
    body.append(f"{target}_fn({args})")
    return body


def _namespace(**bound: Any) -> dict[str, Any]:
    """The generated function's globals: the shared helpers and ``bound``."""
    host, anyp = c_void_p(), c_void_p()
    return bound | {
        "_lock": HOST_LOCK,  # (the callback runs under it: see hostcalls.HOST_LOCK)
        "_ptr_at": ctypes.c_size_t.from_address,
        "_to_host": wasm_values.any_to_host,
        "_to_any": wasm_values.host_to_any,
        "_host_rep": wasm_values.host_rep,
        "_host_delete": wasm_values.host_delete,
        "_host": host,
        "_host_ref": byref(host),
        "_any": anyp,
        "_any_ref": byref(anyp),
        "_resource_error": wasm_values.resource_error,
        "_memmove": ctypes.memmove,
        "_pack_resource": wasm_values.KIND_PTR.pack,
        "_K_RESOURCE": wasm_values.K_RESOURCE,
        "_perf": perf_counter,
    }


def _compile(src: str, ns: dict[str, Any], name: str) -> Callable[..., Any]:
    exec(compile(src, f"<host function {name}>", "exec"), ns)
    fn: Callable[..., Any] = ns["trampoline"]
    return fn


def sync_trampoline(
    name: str,
    fn: Callable[..., Any],
    params: Sequence[Any],
    result: Any,
    resource_ids: Callable[[str], int],
    on_error: Callable[[int, str, Exception], int],
    stats: Any,
) -> Any:
    """The ctypes callback of a host function that returns at once: decodes the
    arguments, calls ``fn(context, *args)``, writes its result. A raised exception
    becomes the returned error (``on_error(ctx, name, e)``). Counts calls and time in
    ``stats``."""
    ns = _namespace(_fn=fn, _name=name, _on_error=on_error, _stats=stats)
    out_lines = _result_lines(result, resource_ids, ns)
    body = _decode_and_call(params, resource_ids, ns, "out = " if out_lines else "")
    body += out_lines
    src = "\n".join(
        [
            "def trampoline(env, ctx, ty, args, nargs, res, nres):",
            "  with _lock:",
            "    t0 = _perf()",
            "    try:",
            *(f"        {line}" for line in body),
            "        return 0",
            "    except Exception as e:",
            "        return _on_error(ctx, _name, e)",
            "    finally:",
            "        _stats.calls += 1",
            "        _stats.seconds += _perf() - t0",
        ]
    )
    return SYNC_CALLBACK(_compile(src, ns, name))


def async_trampoline(
    name: str,
    fn: Callable[..., Any],
    params: Sequence[Any],
    result: Any,
    resource_ids: Callable[[str], int],
    on_error: Callable[[int, str, Exception, int, int], None],
    parked: dict[int, Any],
    keys: Iterator[int],
    continuation: tuple[int, int],
    stats: Any,
) -> Any:
    """The ctypes callback of a host function whose result may come later: ``fn``
    returns a ``Pending``, parked in ``parked`` under a fresh key with its encoder, the
    context and the result address; the guest's continuation is ``continuation``
    (callback and finalizer addresses) with that key. A raised exception ends the guest
    (``on_error(ctx, name, e, err_ret, cont)``)."""
    enc = None if result is None else encoder(result, resource_ids)
    ns = _namespace(_fn=fn, _name=name, _on_error=on_error, _parked=parked, _keys=keys,
                    _cont_fn=continuation[0], _cont_fin=continuation[1], _stats=stats,
                    _enc=enc)  # fmt: skip
    body = _decode_and_call(params, resource_ids, ns, "pending = ")
    src = "\n".join(
        [
            "def trampoline(env, ctx, ty, args, nargs, res, nres, err_ret, cont):",
            "  with _lock:",
            "    t0 = _perf()",
            "    try:",
            *(f"        {line}" for line in body),
            "    except Exception as e:",
            "        _on_error(ctx, _name, e, err_ret, cont)",
            "        return",
            "    key = next(_keys)",
            "    _parked[key] = (pending, _enc, ctx, res)",
            "    # wasmtime_async_continuation_t: callback, env, finalizer (three pointers).",
            "    _ptr_at(cont).value = _cont_fn",
            "    _ptr_at(cont + 8).value = key",
            "    _ptr_at(cont + 16).value = _cont_fin",
            "    _stats.calls += 1",
            "    _stats.seconds += _perf() - t0",
        ]
    )
    return ASYNC_CALLBACK(_compile(src, ns, name))
