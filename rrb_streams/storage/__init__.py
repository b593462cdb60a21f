"""Storage backends behind one small protocol; see :mod:`rrb_streams.storage.base`."""

from rrb_streams.storage.base import ObjectInfo, Storage
from rrb_streams.storage.url import StorageSpec, open_storage, parse_storage_url

__all__ = ["ObjectInfo", "Storage", "StorageSpec", "open_storage", "parse_storage_url"]
