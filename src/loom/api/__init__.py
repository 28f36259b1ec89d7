"""What the HTTP front ends share — the server (``loom serve``) and the router (``loom
router``): the OpenAI request schema, errors in OpenAI's shape, clean exits on SIGTERM.
Below both; imports neither."""
