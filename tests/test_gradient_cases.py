"""The exact gradients of the gradient cases: closed forms against autograd, enumeration against finite
differences, and the tabulated directional derivatives against the reverse-mode gradient."""
import math

import pytest
import torch

from reference_models import case_names, get_case
from reference_models.gradient_cases import (bandit_gradients, gaussian_gradients, policy_logits, sequence_gradients,
                                             sequence_kls, sequence_log_probs)

GRADIENT_CASES = case_names(kind="gradient")
SEQUENCE_GRADIENT_CASES = [c for c in GRADIENT_CASES if get_case(c).length > 1 and not c.endswith("-off")]


def test_gaussian_closed_forms_equal_autograd_of_the_closed_form_kl():
    g = torch.Generator().manual_seed(0)
    mu, log_s, mu_q = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    s_q = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    theta = torch.cat([mu, log_s]).requires_grad_(True)
    m, s = theta[:4], torch.exp(theta[4:])
    kl_pq = (torch.log(s_q / s) + (s ** 2 + (m - mu_q) ** 2) / (2 * s_q ** 2) - 0.5).sum()
    kl_qp = (torch.log(s / s_q) + (s_q ** 2 + (m - mu_q) ** 2) / (2 * s ** 2) - 0.5).sum()
    exact = gaussian_gradients(mu, log_s, mu_q, s_q)
    for name, kl in (("kl", kl_pq), ("reverse_kl", kl_qp)):
        auto = torch.autograd.grad(kl, theta, retain_graph=True)[0]
        torch.testing.assert_close(exact[name], auto, rtol=1e-12, atol=1e-12)


def test_bandit_closed_forms_equal_autograd():
    g = torch.Generator().manual_seed(1)
    a, b = (3 * torch.randn(50, generator=g, dtype=torch.float64) for _ in range(2))
    theta = a.clone().requires_grad_(True)
    lp, lq = torch.log_softmax(theta, -1), torch.log_softmax(b, -1)
    exact = bandit_gradients(a, b)
    for name, kl in (("kl", (lp.exp() * (lp - lq)).sum()), ("reverse_kl", (lq.exp() * (lq - lp)).sum())):
        torch.testing.assert_close(exact[name], torch.autograd.grad(kl, theta, retain_graph=True)[0], rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("name", SEQUENCE_GRADIENT_CASES)
def test_sequence_gradients_match_central_finite_differences(name):
    """(KL(θ + hu) − KL(θ − hu))/2h along three random unit directions, h = 1e-4: truncation O(h²) and
    rounding O(ε/h) keep the relative error far below 1e-6."""
    case = get_case(name.replace("grad-", "seq-"), kind="sequence")
    theta, idx = policy_logits(case)
    grads = sequence_gradients(case, theta, idx)
    g = torch.Generator().manual_seed(2)
    h = 1e-4
    for _ in range(3):
        u = torch.randn(theta.numel(), generator=g, dtype=torch.float64)
        u /= u.norm()
        plus, minus = (sequence_kls(case, sequence_log_probs(case, theta + sign * h * u.view_as(theta), idx))
                       for sign in (1, -1))
        for i, name_ in enumerate(("kl", "reverse_kl")):
            fd = float(plus[i] - minus[i]) / (2 * h)
            exact = float(grads[name_] @ u)
            assert abs(fd - exact) <= 1e-6 * grads[name_].norm(), (name_, fd, exact)


@pytest.mark.parametrize("name", [c for c in GRADIENT_CASES if get_case(c).length > 1 and not c.endswith("-off")])
def test_tabulated_directional_derivatives_give_the_exact_gradient(name):
    """The score identity ∇KL(p‖q)·u_k = Σ_x p(x) (Σ_t ∇log p(x_t|x_<t)·u_k) Σ_t m_t ℓ_t(x), summed over the
    table with its forward-mode ``jvp``, equals the reverse-mode projections ``targets["kl"]``."""
    case = get_case(name)
    t = case.source
    mass = torch.exp(t.log_p.sum(-1))
    ratio = torch.where(t.mask, t.log_p - t.log_q, 0.0).sum(-1)
    projected = torch.einsum("s,sk->k", mass * ratio, t.jvp.sum(1))
    torch.testing.assert_close(projected, case.targets["kl"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_directions_are_orthonormal_and_led_by_the_true_gradient(name):
    case = get_case(name)
    torch.testing.assert_close(case.u @ case.u.T, torch.eye(case.u.shape[0], dtype=torch.float64), atol=1e-10,
                               rtol=0)
    t = case.targets["kl"]
    assert math.isclose(float(t[0]), float(case.grads["kl"].norm()), rel_tol=1e-10)
    assert float(t[1:].abs().max()) <= 1e-10 * float(t[0])


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_draws_follow_the_behaviour_policy_and_carry_the_contract(name):
    case = get_case(name)
    s = case.draw(4096, torch.Generator().manual_seed(3), dtype=torch.float32)
    assert s.log_p.dtype == s.log_q.dtype == s.log_p_old.dtype == torch.float32
    assert s.log_p.shape == s.mask.shape == (4096, case.length) and s.jvp.shape == (4096, case.length, 6)
    on_policy = torch.equal(s.log_p, s.log_p_old)
    assert on_policy != case.off_policy
