"""Choosing the JAX backend from a config, before JAX starts, and starting an experiment's job
(one place for every entry point)."""

from __future__ import annotations

import os
import sys


def start_jax(platform: str, num_cpu_devices: int, matmul_precision: str | None = None,
              compilation_cache_dir: str = ""):
  """Sets the device flags for `platform` and imports jax; returns the jax module.

  platform 'cpu' simulates `num_cpu_devices` host devices (XLA_FLAGS, JAX_PLATFORMS=cpu);
  'default' takes jax's own backend. Must run before anything imports jax: the flags are read
  once, when jax initialises its backends. matmul_precision sets XLA's float32 matmul precision
  for the process ('highest' keeps float32 exact enough for token equality on GPUs).
  compilation_cache_dir: where XLA's persistent compilation cache lives ('' = off). On GPUs its
  keys leave out which device a program runs on (jax strips the device assignment there), so
  engines of one model on different GPUs, and later jobs of the same process, reuse one
  compile instead of compiling the same program once per device.
  """
  if platform not in ("cpu", "default"):
    raise ValueError(f"platform: expected 'cpu' or 'default', got {platform!r}")
  if platform == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={num_cpu_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415  (after the flags above, on purpose)
  if matmul_precision:
    jax.config.update("jax_default_matmul_precision", matmul_precision)
  if compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return jax


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`: a --config.* override of a
  field the config does not have ends the process with one 'error: ...' line naming the flag,
  where ml_collections raises a KeyError/AttributeError traceback; absl's own parse errors (a
  value of the wrong type) also end in one 'error: ...' line."""
  from absl import flags  # noqa: PLC0415  (absl is the scripts' dependency, not the package's)
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except flags.Error as e:  # absl's own parse errors (e.g. a value of the wrong type)
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:
    detail = str(e.args[0]) if e.args else str(e)
    missing, _, hint = detail.partition("\n")
    missing = missing.strip("'\"")
    names = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((n for n in names if missing in n.split(".")[1:]), "a --config.* flag")
    sys.exit(f"error: {culprit}: the config has no field {missing!r}"
             + (f" ({hint.strip()})" if hint.strip() else ""))


def progress_to_stderr(line: str) -> None:
  """The experiment scripts' progress lines: stderr, flushed (stdout keeps the results)."""
  print(line, file=sys.stderr, flush=True)


def start_job(config, workdir: str, kind: str):
  """start_jax as `config` says, then its job: 'offline' (runtime.offline_job.OfflineJob) or
  'online' (runtime.online_job.OnlineJob) in `workdir`. A bad config ends the process with one
  line, 'error: ...' naming the field, instead of a traceback."""
  start_jax(config.platform, config.num_cpu_devices, config.matmul_precision)
  if kind == "offline":
    from dualpath_jax.runtime.offline_job import OfflineJob as job_class  # noqa: PLC0415
  elif kind == "online":
    from dualpath_jax.runtime.online_job import OnlineJob as job_class  # noqa: PLC0415
  else:
    raise ValueError(f"kind: expected 'offline' or 'online', got {kind!r}")
  try:
    return job_class.from_config(config, os.path.abspath(workdir))
  except ValueError as e:
    sys.exit(f"error: {e}")
