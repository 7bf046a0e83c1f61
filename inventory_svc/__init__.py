"""Real-time omnichannel inventory and order-routing service."""

import os

__version__ = "0.1.0"

# We fork only to exec the embedded servers. gRPC's fork handlers, left on, run in those children
# while our gRPC server's threads are live and can abort them (grpc/grpc#13873). Must be set
# before gRPC initialises, which is why it lives in the package's first import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
