"""Config files (configs/*.py, each with get_config(arg)) loaded by path: configs/ is a folder of
files that absl's config flags read, not a package. One loader for the configs that build on
another (online and ablation on offline), the GPU benchmark's base config, and the tests."""

from __future__ import annotations

import importlib.util
import os


def load_config(path: str, arg: str | None = None, *, field: str = "config"):
  """get_config(arg) of the Python file at `path`; `field` names the setting in the error."""
  if not os.path.isfile(path):
    raise ValueError(f"{field}: no config file at {path}")
  name = "_dualpath_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_config_spec(spec: str, root: str, *, field: str = "config"):
  """'path/to/config.py:arg' (path relative to `root` unless absolute) -> its config."""
  path, _, arg = spec.partition(":")
  return load_config(path if os.path.isabs(path) else os.path.join(root, path), arg or None,
                     field=field)
