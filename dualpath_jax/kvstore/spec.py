"""Where the KV store lives: a typed record built once from the `store` section of a config.

  file     a local folder (the default; an embedded store, like 3FS mounted on one node)
  memory   tensorstore's in-memory kvstore, for tests; it lives as long as its ts.Context
  kvstore  any tensorstore kvstore spec (gcs, s3, http, a shared file system via 'file', ...)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

DRIVERS = ("file", "memory", "kvstore")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreSpec:
  """Location and I/O settings of a KV block store."""

  driver: str = "file"
  """'file' (a local folder), 'memory' (tests) or 'kvstore' (the tensorstore spec in `kvstore`)."""
  path: str = ""
  """Folder of the store for 'file' (required); a prefix inside the memory store for 'memory';
  a sub-path appended to the `kvstore` spec's own path for 'kvstore'."""
  kvstore: Mapping[str, Any] | None = None
  """A tensorstore kvstore spec dict, e.g. {'driver': 'gcs', 'bucket': 'b', 'path': 'kv/'}; only
  (and then required) with driver='kvstore'."""
  io_concurrency: int | None = None
  """Concurrent file operations (tensorstore `file_io_concurrency`); None: tensorstore's default
  (max(4, cores))."""
  copy_concurrency: int | None = None
  """Threads that encode/decode chunks and verify their crc32c (tensorstore
  `data_copy_concurrency`); None: one per core."""
  fsync: bool = True
  """Whether the file driver fsyncs each committed chunk (durability across a power loss). Only
  for driver='file'; benchmarks of the page cache may turn it off."""

  def __post_init__(self):
    if self.driver not in DRIVERS:
      raise ValueError(f"store.driver: unknown driver {self.driver!r}; choose file, memory or "
                       "kvstore")
    if not isinstance(self.path, str):
      raise ValueError(f"store.path: expected a string, got {self.path!r}")
    if self.driver == "file" and not self.path:
      raise ValueError("store.path: required for driver 'file' (the folder of the store)")
    if self.driver == "kvstore":
      if not isinstance(self.kvstore, Mapping) or "driver" not in self.kvstore:
        raise ValueError("store.kvstore: driver 'kvstore' needs a tensorstore kvstore spec dict "
                         f"with a 'driver' key, got {self.kvstore!r}")
    elif self.kvstore is not None:
      raise ValueError(f"store.kvstore: only used with driver 'kvstore', not {self.driver!r}")
    for field in ("io_concurrency", "copy_concurrency"):
      value = getattr(self, field)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"store.{field}: expected a positive int or None, got {value!r}")
    if not isinstance(self.fsync, bool):
      raise ValueError(f"store.fsync: expected a bool, got {self.fsync!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "StoreSpec":
    """Builds a spec from a plain dict or an ml_collections.ConfigDict; unknown keys fail."""
    if hasattr(d, "to_dict"):  # ConfigDict, without importing ml_collections here
      d = d.to_dict()
    if not isinstance(d, Mapping):
      raise ValueError(f"store: expected a dict, got {type(d).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in known:
        raise ValueError(f"store.{key}: unknown key; expected one of {', '.join(known)}")
    values = dict(d)
    if values.get("kvstore") is not None and hasattr(values["kvstore"], "to_dict"):
      values["kvstore"] = values["kvstore"].to_dict()
    return cls(**values)

  def kvstore_spec(self) -> dict[str, Any]:
    """The tensorstore kvstore spec of the store's root (its path ends with '/')."""
    if self.driver == "file":
      spec = {"driver": "file", "path": os.path.abspath(self.path)}
      if not self.fsync:
        spec["file_io_sync"] = False
    elif self.driver == "memory":
      spec = {"driver": "memory", "path": self.path}
    else:
      spec = dict(self.kvstore)
      if self.path:
        spec["path"] = _join(spec.get("path", ""), self.path)
    if spec.get("path") and not spec["path"].endswith("/"):
      spec["path"] += "/"
    return spec

  def context_spec(self) -> dict[str, Any]:
    """Resource limits for the ts.Context of the store."""
    spec = {}
    if self.io_concurrency is not None:
      spec["file_io_concurrency"] = {"limit": self.io_concurrency}
    if self.copy_concurrency is not None:
      spec["data_copy_concurrency"] = {"limit": self.copy_concurrency}
    return spec


def _join(prefix: str, path: str) -> str:
  if not prefix:
    return path
  return prefix.rstrip("/") + "/" + path.lstrip("/")
