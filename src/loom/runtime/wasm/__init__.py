"""The wasmtime bindings the runtime runs guests with (the C API through ctypes):
``ffi`` (engines, stores, component and core linkers, calls on fibers), the value codecs
by direction (``values``: the C layout and helpers; ``decode``: guest values to Python;
``encode`` and ``templates``: Python values to guest values) and ``trampoline`` (one
generated callback per host function)."""
