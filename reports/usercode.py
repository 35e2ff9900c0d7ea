"""Calling a user's function so that it can neither fool nor wedge the caller.

:func:`call_user` is the one place where estbench runs code it did not write (a user's estimator, loss or
callback). Whatever that code does, the caller gets one of three outcomes:

- the function's raw return value (checking its shape and values is the caller's job);
- :class:`UserCodeFailure`, a *finding* about the function (it raised, called ``sys.exit``, hung past the
  timeout, or modified an input in place), whose message is one line saying what happened;
- :class:`SignatureMismatch`, a *usage* error: the function cannot be called with the arguments an
  estimator of that form gets.

No exception from user code, ``SystemExit`` and ``KeyboardInterrupt`` included, reaches the caller as
itself. Out of reach here: a function that calls ``os._exit`` or crashes the interpreter (``estbench gate``
therefore runs the gate in a child process and catches a child that ends without a verdict), and a thread it
starts itself.
"""

from __future__ import annotations

import inspect
import threading

import torch

__all__ = ["UserCodeFailure", "SignatureMismatch", "call_user", "abandoned"]

_MAX_MESSAGE = 300  # characters of a user exception's message kept in a finding


class UserCodeFailure(Exception):
    """The user's function failed in a way that is a finding about it; the message is one line."""


class SignatureMismatch(ValueError):
    """The user's function cannot be called with the arguments its form prescribes: a usage error."""


_abandoned = 0
_abandoned_lock = threading.Lock()


def abandoned() -> int:
    """How many calls of this process timed out, their thread abandoned, maybe still running (daemon
    threads: they do not keep the process alive, but torch code still running at interpreter shutdown can crash it, so a
    command line should end with ``os._exit`` after flushing its output when this is not 0)."""
    return _abandoned


def _text(obj, show=str) -> str:
    """``show(obj)`` folded onto one line and shortened; a hostile ``__str__``/``__repr__`` cannot raise."""
    try:
        text = " ".join(show(obj).split())
    except BaseException:  # noqa: BLE001 - user objects may raise anything from __str__
        return f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 1] + "…"


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"called sys.exit({'' if err.code is None else _text(err.code, repr)})"
    message = _text(err)
    return f"raised {type(err).__name__}" + (f": {message}" if message else "")


def _call_form(names: tuple[str, ...]) -> str:
    return f"f({', '.join(names)})"


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or _text(fn, repr)


def _check_signature(fn, args: tuple, names: tuple[str, ...]) -> None:
    if not callable(fn):
        raise SignatureMismatch(f"{_name(fn)} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the call itself tells
        return
    try:
        signature.bind(*args)
    except TypeError as err:
        raise SignatureMismatch(f"{_name(fn)}{signature} cannot be called as {_call_form(names)}: {err}") from None


def _run(fn, args: tuple, names: tuple[str, ...]):
    """``fn(*args)``, with everything it may raise mapped to UserCodeFailure or SignatureMismatch."""
    try:
        return fn(*args)
    except TypeError as err:
        if err.__traceback__.tb_next is None:  # raised while binding the call: no frame inside fn
            raise SignatureMismatch(f"{_name(fn)} cannot be called as {_call_form(names)}: {_text(err)}") from err
        raise UserCodeFailure(_describe(err)) from err
    except BaseException as err:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from user code are findings
        raise UserCodeFailure(_describe(err)) from err


def _run_with_timeout(fn, args: tuple, names: tuple[str, ...], timeout: float):
    """:func:`_run` in a daemon thread with the caller's grad and inference modes (thread-local in torch);
    on expiry the thread is abandoned and counted. A real Ctrl-C reaches the caller, which only waits."""
    global _abandoned
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    box: list = []

    def work():
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            try:
                box.append((True, _run(fn, args, names)))
            except BaseException as err:  # noqa: BLE001 - _run raises only our two kinds; hand them over
                box.append((False, err))

    thread = threading.Thread(target=work, name=f"estbench-user-{_name(fn)}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        with _abandoned_lock:
            _abandoned += 1
        raise UserCodeFailure(f"did not return within {timeout:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _unchanged(clone: torch.Tensor, original: torch.Tensor) -> bool:
    """Same shape, dtype and values, a NaN equal to a NaN."""
    a, b = clone.detach(), original.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def call_user(fn, args: tuple, *, names: tuple[str, ...], timeout: float | None = None):
    """``fn(*args)`` such that ``fn`` can neither fool nor wedge the caller; returns its raw output.

    ``names`` names the arguments (``("log_p", "log_q")``) for the messages. Before the call, the
    arguments are bound to ``inspect.signature(fn)`` (skipped where a builtin has none), and a failure is
    :class:`SignatureMismatch`, as is a TypeError raised by the call itself rather than from inside ``fn``.
    ``fn`` gets its own clone of every tensor argument (``Tensor.clone``, so autograd still flows to the
    original), so it can never corrupt data shared with other estimators; after the call each clone is
    compared with its original and a difference is a :class:`UserCodeFailure` naming the argument
    ("modified its input log_p in place"). Any exception from ``fn``, ``SystemExit`` and
    ``KeyboardInterrupt`` included, is a :class:`UserCodeFailure` ("raised ValueError: ...",
    "called sys.exit(0)"), chained to the original. With ``timeout`` (seconds), ``fn`` runs in a daemon
    thread and a call that has not returned by then is a :class:`UserCodeFailure` ("did not return within
    30 s"); its thread is abandoned and counted by :func:`abandoned`. With ``timeout=None`` it runs in the
    caller's thread, where a real Ctrl-C during ``fn`` cannot be told from one ``fn`` raises itself.

    Cost: one clone and one comparison per tensor argument (plus, with a timeout, one thread start,
    ~0.1 ms), small beside an estimator that reads every element of its inputs anyway.
    """
    if len(names) != len(args):
        raise ValueError(f"names {names!r} must name each of the {len(args)} arguments")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    _check_signature(fn, args, names)
    own = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = _run(fn, own, names) if timeout is None else _run_with_timeout(fn, own, names, timeout)
    for name, original, clone in zip(names, args, own):
        if isinstance(original, torch.Tensor) and not _unchanged(clone, original):
            raise UserCodeFailure(f"modified its input {name} in place")
    return out
