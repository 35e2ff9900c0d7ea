"""Executors for :func:`reports.stats.run_jobs`: ``local`` (this process) and ``ray`` (a local Ray runtime or
an existing cluster).

Each chunk is one Ray task, seeded from its key and index alone and run on one torch thread, so a study or a
gate gives the same numbers, bit for bit, on any number of workers and as a local run on one thread
(``torch.set_num_threads(1)``; with more threads torch's float sums round differently, by ~1e-16 relative),
given the same torch build and CPU instruction set on every node. Results stream back as tasks finish
(``ray.wait``); a task whose worker dies is run again (``max_retries``), so a lost worker costs time, never a
number. The functions a task carries from a module that no installed distribution provides (a user's
estimator loaded from the current directory) are pickled by value, so workers need not import it; estbench
itself must be installed on every node of an existing cluster.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
import os
import socket
import sys
from typing import Any, Hashable

import torch

from .stats import Executor, LocalExecutor, Task

__all__ = ["EXECUTORS", "ExecutorUnavailable", "RayExecutor", "make_executor"]

EXECUTORS = ("local", "ray")
INSTALL_RAY = "pip install -e '.[ray]'"
CONNECT_TIMEOUT = 10.0  # seconds to reach a named cluster's address before giving up


class ExecutorUnavailable(RuntimeError):
    """The executor cannot start (Ray not installed, the cluster not reachable); the message is one line."""


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None) -> Executor:
    """The executor called ``name``; for ``ray``, joined to the cluster at ``address`` (default: the
    ``RAY_ADDRESS`` environment variable), else a local Ray runtime with ``num_cpus`` workers (default: all)."""
    if name == "local":
        if address is not None:
            raise ValueError("address names a Ray cluster: it needs the ray executor")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address or os.environ.get("RAY_ADDRESS") or None, num_cpus)
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")


def _run(task: Task) -> Any:
    """``task`` on one torch thread: a float reduction's rounding depends on how many threads share it."""
    torch.set_num_threads(1)
    return task()


class RayExecutor:
    """Each task a Ray task of one CPU, retried ``retries`` times when its worker dies; ``slots`` = 2 × the
    cluster's CPUs, so that a worker finds its next chunk waiting."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, retries: int = 3):
        try:
            import ray
        except ImportError as err:
            raise ExecutorUnavailable(f"the ray executor needs Ray: {INSTALL_RAY}") from err
        self._ray, self._started = ray, not ray.is_initialized()
        if self._started:
            if address not in (None, "auto", "local"):
                _reach(address)
            own = {} if address else dict(num_cpus=num_cpus, include_dashboard=False)
            ray.init(address=address, log_to_driver=False, logging_level="WARNING", **own)
        self._remote = ray.remote(_run).options(max_retries=retries, retry_exceptions=False)
        self.slots = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._pending: set = set()

    def submit(self, task: Task) -> Hashable:
        _ship_by_value(task)
        ref = self._remote.remote(task)
        self._pending.add(ref)
        return ref

    def finished(self) -> list[tuple[Hashable, Any]]:
        ray = self._ray
        ray.wait(list(self._pending), num_returns=1)
        done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        self._pending.difference_update(done)
        return [(ref, self._get(ref)) for ref in done]

    def _get(self, ref) -> Any:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as err:  # the task's own exception, as a local run raises it
            raise err.cause from err

    def cancel(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref)
        self._pending.clear()

    def close(self) -> None:
        """End the local Ray runtime this executor started (a joined cluster stays up)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def _reach(address: str) -> None:
    """Raise ExecutorUnavailable unless a TCP connection to ``address`` (host:port, or ray://host[:port])
    opens within :data:`CONNECT_TIMEOUT` seconds: Ray itself waits minutes for a cluster that is not there."""
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        host, port = address.removeprefix("ray://"), ("10001" if client else "6379")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ExecutorUnavailable(f"no Ray cluster reachable at {address!r} ({err.strerror or err}; tried for at "
                                  f"most {CONNECT_TIMEOUT:g} s)") from err


@functools.lru_cache(maxsize=None)
def _installed(top: str) -> bool:
    return top in sys.stdlib_module_names or top in ("builtins", "__main__") or \
        top in importlib.metadata.packages_distributions()


def _ship_by_value(obj, depth: int = 0) -> None:
    """Register with Ray's cloudpickle, by value, the module of each function or class in ``obj`` (through
    tuples, lists, dicts, dataclasses and partials) that no installed distribution provides."""
    if depth > 8:
        return
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _ship_by_value(item, depth + 1)
    elif isinstance(obj, dict):
        _ship_by_value(list(obj.values()), depth + 1)
    elif isinstance(obj, functools.partial):
        _ship_by_value((obj.func, obj.args, obj.keywords), depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _ship_by_value([getattr(obj, f.name) for f in dataclasses.fields(obj)], depth + 1)
    else:
        module = obj.__module__ if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj).__module__
        if module and not _installed(module.partition(".")[0]) and module in sys.modules:
            from ray import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[module])
