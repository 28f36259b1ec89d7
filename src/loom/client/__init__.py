"""Client library for a Loom server: upload programs, launch inferlets, talk to them.

``Client`` is asyncio-based; ``SyncClient`` wraps it for scripts without an event loop.
"""

from loom.client.client import Client, ClientError, Instance, InstanceStatus
from loom.client.sync import SyncClient, SyncInstance

__all__ = ["Client", "ClientError", "Instance", "InstanceStatus", "SyncClient", "SyncInstance"]
