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
from ._open import HotSet, open, open_async
from ._sizes import Size
from ._tensor import TensorInfo
from .formats import ArraySummary, ModelIndex, read_index
from .pager._lease import AcquireContext, Lease, LeaseGroup
from .pager._pager import Pager
from .pager._request import RequestScope, RequestStats
from .pager._row_blocks import RowBlocks
from .pager._stats import LatencyHistogram, LatencySummary, PagerStats
from .sources._cache import DiskCache
from .sources._files import AiofilesSource, ConcatSource, FileSource, MmapSource, MultiFileSource
from .sources._remote import ObjectStoreSource, RemoteStats
from .sources._source import MemorySource, Source

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
