"""Parts of ``benchmarks/soak.py``: the server and what is read of it (``server``), the
well-behaved clients and their statistics (``clients``), the hostile actors run in a
process of their own (``hostile``) and the bad inputs to the HTTP and WebSocket APIs
(``bad_inputs``)."""
