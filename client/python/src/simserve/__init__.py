"""simserve — Python client for the simserve gRPC service (batched pairwise similarity).

    import numpy as np, simserve
    with simserve.Client("localhost:50051") as c:
        S = c.similarity(np.random.rand(100, 400, 200), np.random.rand(100, 500, 200))

See `Client` for options, `simserve.aio.Client` for asyncio, `simserve.Error` for errors.
"""

from simserve._common import Info, RetryPolicy, Timings
from simserve.client import Client
from simserve.errors import (CancelledError, DeadlineExceededError, Error,
                             FailedPreconditionError, InternalError, InvalidArgumentError,
                             ProtocolError, ResourceExhaustedError, UnavailableError,
                             UnimplementedError)

__version__ = "0.1.0"
__all__ = [
    "Client", "Info", "RetryPolicy", "Timings", "Error", "InvalidArgumentError",
    "ResourceExhaustedError", "DeadlineExceededError", "CancelledError", "UnavailableError",
    "UnimplementedError", "FailedPreconditionError", "InternalError", "ProtocolError",
]
