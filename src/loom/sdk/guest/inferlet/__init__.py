"""The inferlet SDK: write ``async def main(args)`` and drive generation from Python.

Inside a built inferlet everything below is available. Outside one (natively: an
editor, a type checker, a test) everything imports, and the pure parts work (samplers,
stop conditions, the loop, KV page math); a call into the host says it needs a built
inferlet.
"""

from inferlet._loop import gather, spawn, yield_now
from inferlet.sampler import Greedy, MinP, Sampler, Temperature, TopK, TopP
from inferlet.stop import IgnoreEos, MaxTokens, Stop, StopStrings, StopTokens

__all__ = [
    "Greedy", "IgnoreEos", "MaxTokens", "MinP", "Sampler", "Stop", "StopStrings",
    "StopTokens", "Temperature", "TopK", "TopP", "gather", "spawn", "yield_now",
]  # fmt: skip

from inferlet.context import Completion, Context, Drafter, decode_all
from inferlet.grammar import Choice, Constraint, Grammar, JsonObject, JsonSchema, Matcher, Regex
from inferlet.io import (
    Child,
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
    "Child", "Choice", "Completion", "Constraint", "Context", "Drafter", "Grammar", "JsonObject",
    "JsonSchema", "Matcher", "Model", "Regex", "Response", "Tokenizer", "broadcast", "decode_all",
    "get_arguments", "get_model", "http_get", "http_post", "http_request",
    "instance_id", "launch", "log", "pull", "push", "receive", "send", "store_delete",
    "store_get", "store_list", "store_set", "subscribe",
]  # fmt: skip
