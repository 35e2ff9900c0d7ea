"""reports.usercode: a user's function can neither fool nor wedge the caller."""

import sys
import threading
import time

import pytest
import torch

from estimators.kl import k1
from reports.usercode import SignatureMismatch, UserCodeFailure, abandoned, call_user

NAMES = ("log_p", "log_q")


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)


def failure(fn, args, **kw) -> str:
    with pytest.raises(UserCodeFailure) as info:
        call_user(fn, args, names=NAMES, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_correct_function_returns_its_result_unchanged(pair):
    marker = torch.tensor([1.0, 2.0])
    assert call_user(lambda p, q: marker, pair, names=NAMES) is marker
    assert torch.equal(call_user(k1, pair, names=NAMES), k1(*pair))
    assert torch.equal(call_user(k1, pair, names=NAMES, timeout=5.0), k1(*pair))


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_exceptions_are_findings(pair, timeout):
    def raises(p, q):
        raise ValueError("bad\ninput")

    assert failure(raises, pair, timeout=timeout) == "raised ValueError: bad input"

    def interrupts(p, q):
        raise KeyboardInterrupt

    assert failure(interrupts, pair, timeout=timeout) == "raised KeyboardInterrupt"


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("code, shown", [(0, "sys.exit(0)"), (3, "sys.exit(3)"), (None, "sys.exit()"),
                                         ("why", "sys.exit('why')")])
def test_sys_exit_is_a_finding(pair, timeout, code, shown):
    assert failure(lambda p, q: sys.exit(code), pair, timeout=timeout) == f"called {shown}"


def test_a_hostile_exception_message_cannot_raise(pair):
    class Nasty(Exception):
        def __str__(self):
            raise RuntimeError("no")

    def raises(p, q):
        raise Nasty

    assert failure(raises, pair) == "raised Nasty: <unprintable Nasty>"


def test_hang_times_out_and_is_counted(pair):
    stop = threading.Event()  # set at the end, so that the abandoned threads stop burning CPU

    def spins(p, q):
        while not stop.is_set():
            pass

    try:
        before = abandoned()
        for fn in (spins, lambda p, q: stop.wait()):
            start = time.perf_counter()
            assert failure(fn, pair, timeout=0.5) == "did not return within 0.5 s"
            assert time.perf_counter() - start < 2.0
        assert abandoned() == before + 2
    finally:
        stop.set()


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_in_place_mutation_is_named_and_the_original_untouched(pair, timeout):
    log_p, log_q = pair
    before = log_q.clone()

    def mutates(p, q):
        q.mul_(2)
        return p - q

    assert failure(mutates, pair, timeout=timeout) == "modified its input log_q in place"
    assert torch.equal(log_q, before)

    def resizes(p, q):
        p.resize_(3)
        return q

    assert failure(resizes, pair, timeout=timeout) == "modified its input log_p in place"
    assert log_p.shape == (64,)


def test_nan_inputs_left_alone_are_unchanged():
    nan = torch.tensor([float("nan"), 1.0])
    assert torch.equal(call_user(lambda p, q: q, (nan, torch.ones(2)), names=NAMES), torch.ones(2))


def test_gradient_flows_through_the_clone_and_grad_mode_is_kept(pair):
    log_p = pair[0].clone().requires_grad_()
    call_user(k1, (log_p, pair[1]), names=NAMES, timeout=5.0).sum().backward()
    assert torch.equal(log_p.grad, torch.ones(64, dtype=torch.float64))  # k1 = log_p - log_q
    with torch.no_grad():
        assert not call_user(k1, (log_p, pair[1]), names=NAMES, timeout=5.0).requires_grad


@pytest.mark.parametrize("fn", [lambda p: p, lambda p, q, mask: p, lambda p, q, *, scale: p, 3])
def test_wrong_signature_is_a_usage_error(pair, fn):
    with pytest.raises(SignatureMismatch, match="f\\(log_p, log_q\\)|not callable"):
        call_user(fn, pair, names=NAMES)


def test_builtin_without_signature_mismatch_found_by_the_call(pair):
    with pytest.raises(SignatureMismatch, match="cannot be called as f\\(log_p, log_q\\)"):
        call_user(torch.exp, pair, names=NAMES)
    assert torch.equal(call_user(torch.sub, pair, names=NAMES), pair[0] - pair[1])


def test_type_error_inside_the_function_is_a_finding(pair):
    def wrong_types(p, q):
        return p + "q"

    assert failure(wrong_types, pair).startswith("raised TypeError: unsupported operand")
