"""The inferlet SDK: write ``async def main(args)`` and drive generation from Python.

Inside a built inferlet everything below is available. Outside one (natively, for
tests) only the pure parts import: samplers, stop conditions, the loop, KV page math.
"""

from inferlet._loop import gather, spawn, yield_now
from inferlet.sampler import Greedy, MinP, Sampler, Temperature, TopK, TopP
from inferlet.stop import IgnoreEos, MaxTokens, Stop, StopStrings, StopTokens

__all__ = [
    "Greedy", "IgnoreEos", "MaxTokens", "MinP", "Sampler", "Stop", "StopStrings",
    "StopTokens", "Temperature", "TopK", "TopP", "gather", "spawn", "yield_now",
]  # fmt: skip

try:
    import wit_world  # noqa: F401  (the bindings exist only inside a built inferlet)
except ImportError:
    pass
else:
    from inferlet.context import Context, Drafter, decode_all
    from inferlet.io import (
        Response,
        broadcast,
        get_arguments,
        http_get,
        http_post,
        http_request,
        instance_id,
        launch,
        log,
        pull,
        push,
        receive,
        send,
        store_delete,
        store_get,
        store_list,
        store_set,
        subscribe,
    )  # fmt: skip
    from inferlet.model import Model, Tokenizer, get_model

    __all__ += [
        "Context", "Drafter", "Model", "Response", "Tokenizer", "broadcast", "decode_all",
        "get_arguments", "get_model", "http_get", "http_post", "http_request",
        "instance_id", "launch", "log", "pull", "push", "receive", "send", "store_delete",
        "store_get", "store_list", "store_set", "subscribe",
    ]  # fmt: skip
