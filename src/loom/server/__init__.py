"""The HTTP + WebSocket server: the inferlet protocol, the OpenAI-compatible API,
``/v1/inferlets/run``, ``/health`` and ``/metrics``."""
