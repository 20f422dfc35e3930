"""simserve — Python client for the simserve gRPC service (batched pairwise similarity).

    import numpy as np, simserve
    with simserve.Client("localhost:50051") as c:
        S = c.similarity(np.random.rand(100, 400, 200), np.random.rand(100, 500, 200))
        g = c.register_gallery("faces", np.random.rand(500, 200))  # B kept on the server
        S = g.similarity(np.random.rand(400, 200))                   # [400, 500]

See `Client` for options, `Gallery` for server-side galleries, `simserve.aio.Client` for
asyncio, `simserve.Error` for errors.
"""

from simserve._common import GalleryInfo, Info, RetryPolicy, Timings
from simserve.client import Client, Gallery
from simserve.errors import (CancelledError, DeadlineExceededError, Error,
                             FailedPreconditionError, InternalError, InvalidArgumentError,
                             NotFoundError, ProtocolError,
                             ResourceExhaustedError, UnauthenticatedError, UnavailableError,
                             UnimplementedError)

__version__ = "0.1.0"
__all__ = [
    "Client", "Gallery", "GalleryInfo", "Info", "RetryPolicy", "Timings", "Error",
    "InvalidArgumentError", "ResourceExhaustedError", "DeadlineExceededError",
    "CancelledError", "UnavailableError", "NotFoundError", "UnimplementedError",
    "FailedPreconditionError", "UnauthenticatedError",
    "InternalError", "ProtocolError",
]
