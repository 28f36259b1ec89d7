"""The wasmtime bindings the runtime runs guests with (the C API through ctypes):
``ffi`` (engines, stores, component and core linkers, calls on fibers), ``codec`` (values
between Python and the component model, by direction) and ``trampoline`` (one generated
callback per host function)."""
