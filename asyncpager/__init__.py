"""asyncpager: page the weights of a large model between disk and a fixed RAM budget,
for asyncio inference servers.

    import asyncpager as ap
    async with ap.open("model.gguf", budget_bytes=2 << 30, prefetch_depth=1) as pager:
        async with pager.acquire_layer(3) as layer:
            ...
"""

from ._errors import (
    BudgetExceeded,
    FormatError,
    LeaseWarning,
    PagerClosed,
    PagerError,
    SourceError,
    TensorNotFound,
)
from ._flight import LoadFlight
from ._formats import ArraySummary, ModelIndex, read_index
from ._lease import AcquireContext, Lease, LeaseGroup
from ._open import HotSet, open, open_async
from ._pager import Pager
from ._remote import DiskCache, ObjectStoreSource, RemoteStats
from ._request import RequestScope, RequestStats
from ._row_blocks import RowBlocks
from ._sizes import Size
from ._sources import (
    AiofilesSource,
    ConcatSource,
    FileSource,
    MemorySource,
    MmapSource,
    MultiFileSource,
    Source,
)
from ._stats import LatencyHistogram, LatencySummary, PagerStats
from ._tensor import TensorInfo

__all__ = [
    "AcquireContext",
    "AiofilesSource",
    "ArraySummary",
    "BudgetExceeded",
    "ConcatSource",
    "DiskCache",
    "FileSource",
    "FormatError",
    "HotSet",
    "LatencyHistogram",
    "LatencySummary",
    "Lease",
    "LeaseGroup",
    "LeaseWarning",
    "LoadFlight",
    "MemorySource",
    "MmapSource",
    "ModelIndex",
    "MultiFileSource",
    "ObjectStoreSource",
    "Pager",
    "PagerClosed",
    "PagerError",
    "PagerStats",
    "RemoteStats",
    "RequestScope",
    "RequestStats",
    "RowBlocks",
    "Size",
    "Source",
    "SourceError",
    "TensorInfo",
    "TensorNotFound",
    "open",
    "open_async",
    "read_index",
]
__version__ = "0.1.0"
