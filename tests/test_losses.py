"""Tests for train/losses.py.

Every loss is checked against an independent, literal computation of its
equation (python loops over plain floats, explicit full-vocabulary softmax,
explicit tail bin, explicit enumeration of orderings with itertools), never
by calling the function under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from train import losses as L

R, V, K, H = 7, 11, 3, 5
LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# literal reference implementations (plain python floats)
# --------------------------------------------------------------------------


def ref_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def ref_kl_tail(student_row, ids, teacher_logp_row):
    q_full = ref_softmax(student_row)
    p = [math.exp(x) for x in teacher_logp_row]
    q = [q_full[i] for i in ids]
    p.append(1.0 - sum(p))
    q.append(1.0 - sum(q))
    total = 0.0
    for pj, qj in zip(p, q):
        if pj > 0:
            total += pj * (math.log(pj) - math.log(qj))
    return total


def ref_logsigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def ref_pl_prob(rewards, tau):
    """Plackett-Luce probability of ordering tau, literally: product of choices."""
    remaining = list(range(len(rewards)))
    prob = 1.0
    for k in tau:
        denom = sum(math.exp(rewards[j]) for j in remaining)
        prob *= math.exp(rewards[k]) / denom
        remaining.remove(k)
    return prob


def ref_jsd(r_s, r_t):
    total = 0.0
    for tau in itertools.permutations(range(len(r_s))):
        ps, pt = ref_pl_prob(r_s, tau), ref_pl_prob(r_t, tau)
        m = 0.5 * (ps + pt)
        if ps > 0:
            total += 0.5 * ps * math.log(ps / m)
        if pt > 0:
            total += 0.5 * pt * math.log(pt / m)
    return total


def ref_teacher_order(r_t):
    return sorted(range(len(r_t)), key=lambda i: (-r_t[i], i))


def ref_vpd(r_s, r_t):
    return -math.log(ref_pl_prob(r_s, ref_teacher_order(r_t)))


def make_teacher(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(R, V, generator=g, dtype=dtype) * 2
    t_logp = torch.log_softmax(t_logits, -1)
    topk_logp, topk_ids = t_logp.topk(K, dim=-1)
    return t_logits, topk_ids, topk_logp


def rand(*shape, seed=1, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


# --------------------------------------------------------------------------
# token level
# --------------------------------------------------------------------------


def test_token_logprobs_matches_literal():
    logits = rand(R, V, seed=3, scale=3)
    tgt = torch.randint(0, V, (R,), generator=torch.Generator().manual_seed(4))
    out = L.token_logprobs(logits, tgt)
    assert out.shape == (R,)
    for r in range(R):
        q = ref_softmax(logits[r].tolist())
        assert out[r].item() == pytest.approx(math.log(q[tgt[r].item()]), abs=1e-12)


def test_token_logprobs_bf16_upcast_returns_float32():
    logits = rand(R, V, seed=3, scale=3).to(torch.bfloat16)
    tgt = torch.zeros(R, dtype=torch.long)
    out = L.token_logprobs(logits, tgt)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1)[:, 0]
    torch.testing.assert_close(out, ref)


def test_kd_tail_kl_matches_literal_with_tail_bin():
    _, ids, tlp = make_teacher()
    s = rand(R, V, seed=5, scale=2)
    out = L.kd_tail_kl(s, ids, tlp)
    assert out.shape == (R,)
    for r in range(R):
        ref = ref_kl_tail(s[r].tolist(), ids[r].tolist(), tlp[r].tolist())
        assert out[r].item() == pytest.approx(ref, abs=1e-10)
    assert (out > 0).all()


def test_kd_zero_when_student_equals_teacher_on_ids_and_tail():
    t_logits, ids, tlp = make_teacher()
    assert L.kd_tail_kl(t_logits, ids, tlp).abs().max().item() < 1e-12
    # Same top-K probabilities and same total tail mass, but the tail mass
    # redistributed among the non-top-K tokens: still KL 0 over K+1 bins.
    s = t_logits.clone()
    t_prob = torch.softmax(t_logits, -1)
    for r in range(R):
        out_ids = [v for v in range(V) if v not in ids[r].tolist()]
        tail = t_prob[r, out_ids].sum()
        new = torch.zeros(len(out_ids), dtype=torch.float64)
        new[0] = 0.9 * tail
        new[1:] = 0.1 * tail / (len(out_ids) - 1)
        probs = t_prob[r].clone()
        probs[out_ids] = new
        s[r] = probs.log()
    assert not torch.allclose(torch.softmax(s, -1), t_prob)
    assert L.kd_tail_kl(s, ids, tlp).abs().max().item() < 1e-12
    # Anything else on the K+1 bins: strictly positive.
    s2 = t_logits.clone()
    s2[torch.arange(R), ids[:, 0]] -= 1.0
    assert (L.kd_tail_kl(s2, ids, tlp) > 1e-6).all()


def test_kd_tail_bucket_keeps_it_a_kl_where_truncated_sum_goes_negative():
    # Student puts more mass than the teacher on every top-K id: the truncated
    # sum sum_k p_k log(p_k/q_k) is negative, the K+1-bin KL is positive.
    _, ids, tlp = make_teacher()
    p = tlp.exp()
    assert (p.sum(-1) < 0.99).all()
    q_full = torch.full((R, V), 0.001 / (V - K), dtype=torch.float64)
    q_full.scatter_(1, ids, 0.999 * p / p.sum(-1, keepdim=True))  # q_k > p_k for every k
    s = q_full.log()
    q = torch.softmax(s, -1).gather(1, ids)
    truncated = (tlp.exp() * (tlp - q.log())).sum(-1)
    assert (truncated < 0).all()
    out = L.kd_tail_kl(s, ids, tlp)
    assert (out > 0).all()
    for r in range(R):
        assert out[r].item() == pytest.approx(
            ref_kl_tail(s[r].tolist(), ids[r].tolist(), tlp[r].tolist()), abs=1e-10
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_teacher_mass_all_on_topk_stays_finite(dtype):
    s = rand(R, V, seed=7, dtype=dtype).requires_grad_(True)
    ids = torch.arange(K).expand(R, K).contiguous()
    # teacher puts (numerically) all the mass on the top-K, sum exp == 1 or a hair above
    tlp = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=dtype)).expand(R, K).clone()
    tlp[0] = torch.tensor([0.0, -1e4, -1e4], dtype=dtype)  # one token with all the mass
    tlp[1] = torch.log(torch.tensor([0.5, 0.3, 0.2 + 1e-6], dtype=dtype))  # sums slightly > 1
    tlp[2, 2] = -float("inf")  # teacher probability exactly 0 on one id
    out = L.kd_tail_kl(s, ids, tlp)
    assert torch.isfinite(out).all()
    assert (out > -1e-5).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    # p_tail ~ 0 contributes ~0: compare row 3 with the K-bin KL plus nothing
    sd = s.detach().double()
    q = torch.softmax(sd, -1)[3, :K]
    p = tlp[3].double().exp()
    expected = (p * (p.log() - q.log())).sum().item()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert out[3].item() == pytest.approx(expected, abs=tol)


# --------------------------------------------------------------------------
# KD's tail bins: exact student tail, stored teacher tail (float64 literal references)
# --------------------------------------------------------------------------


def ref_logsumexp(values):
    """log(sum(exp(v))) of plain floats, exact in float64 for any spread (fsum of shifted exponentials)."""
    values = list(values)
    m = max(values)
    if m == -math.inf:
        return -math.inf
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


def ref_kd_bins(student_row, ids, teacher_logp_row, teacher_tail=None):
    """(P, log q) over the K+1 bins, literally: P the teacher's bins divided by their sum (its tail given,
    or 1 - sum of its top-K), log q the student's log-softmax at the ids and log of its mass outside them."""
    lse_all = ref_logsumexp(student_row)
    outside = [x for v, x in enumerate(student_row) if v not in set(ids)]
    log_q = [student_row[i] - lse_all for i in ids] + [ref_logsumexp(outside) - lse_all]
    p = [math.exp(t) for t in teacher_logp_row]
    p.append(math.exp(teacher_tail) if teacher_tail is not None else 1.0 - math.fsum(p))
    total = math.fsum(p)
    return [x / total for x in p], log_q


def ref_kd(student_row, ids, teacher_logp_row, teacher_tail=None):
    P, log_q = ref_kd_bins(student_row, ids, teacher_logp_row, teacher_tail)
    return math.fsum(pj * (math.log(pj) - lq) for pj, lq in zip(P, log_q) if pj > 0)


def ref_kd_grad(student_row, ids, teacher_logp_row, teacher_tail=None):
    """d KD / d logits[v] = q_v - w_v with w the teacher's bin mass of v's bin spread within the bin as the
    student spreads it: w = P_k at id k, P_tail * q_v / q_tail outside the ids."""
    P, log_q = ref_kd_bins(student_row, ids, teacher_logp_row, teacher_tail)
    lse_all = ref_logsumexp(student_row)
    grad = []
    for v, x in enumerate(student_row):
        q = math.exp(x - lse_all)
        if v in ids:
            grad.append(q - P[list(ids).index(v)])
        else:
            grad.append(q - P[-1] * math.exp(x - lse_all - log_q[-1]))
    return grad


def overconfident_case(dtype):
    """V = 1000, K = 50: the student puts all but ~1e-11 of its mass on the teacher's top-K, the teacher 0.7."""
    v, k = 1000, 50
    g = torch.Generator().manual_seed(50)
    logits = torch.randn(2, v, generator=g, dtype=torch.float64)
    logits[:, k:] -= 30.0  # mass outside the first K: about 950 e^-30 / 50 ~ 2e-12
    ids = torch.arange(k).expand(2, k).contiguous()
    teacher = torch.log_softmax(torch.randn(2, k, generator=g, dtype=torch.float64), -1) + math.log(0.7)
    return logits.to(dtype), ids, teacher.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_overconfident_student_matches_float64_literal(dtype):
    logits, ids, tlp = overconfident_case(dtype)
    x = logits.clone().requires_grad_(True)
    out = L.kd_tail_kl(x, ids, tlp)
    out.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for r in range(2):
        row = logits[r].double().tolist()
        expected = ref_kd(row, ids[r].tolist(), tlp[r].double().tolist())
        assert expected > 5.0  # p_tail log(p_tail / q_tail) with q_tail ~ 1e-12: a large, informative loss
        assert out[r].item() == pytest.approx(expected, rel=tol)
        grad = ref_kd_grad(row, ids[r].tolist(), tlp[r].double().tolist())
        # the tail bin's gradient: sum over the ids outside the top-K of q_v - P_tail q_v / q_tail = q_tail - P_tail
        tail_grad = math.fsum(grad[50:])
        assert tail_grad == pytest.approx(-0.3, abs=1e-6)
        assert x.grad[r, 50:].double().sum().item() == pytest.approx(tail_grad, abs=1e-5 if dtype == torch.float32 else 1e-12)
        for v in range(0, 1000, 37):
            assert x.grad[r, v].item() == pytest.approx(grad[v], abs=1e-6 if dtype == torch.float32 else 1e-13)
    # the former tail, log(1 - sum_k q_k), is lost in float32 rounding here: that is what the exact tail fixes
    if dtype == torch.float32:
        ls = torch.log_softmax(logits, -1)
        exact = torch.tensor([ref_logsumexp(logits[r, 50:].double().tolist()) - ref_logsumexp(logits[r].double().tolist())
                              for r in range(2)], dtype=torch.float64)
        assert ((L._tail_logmass(ls.gather(-1, ids)).double() - exact).abs() > 5).all()  # rounding noise or the clamp
        torch.testing.assert_close(L.student_tail_logmass(ls, ids).double(), exact, rtol=0, atol=1e-4)


def test_kd_gradient_is_q_minus_teacher_bin_mass_at_ordinary_values():
    _, ids, tlp = make_teacher()
    tail = torch.log(1 - tlp.exp().sum(-1)) + 0.004  # a stored tail, a little off: bins renormalised
    s = rand(R, V, seed=51, scale=2).requires_grad_(True)
    out = L.kd_tail_kl(s, ids, tlp, tail)
    out.sum().backward()
    for r in range(R):
        row = s[r].detach().tolist()
        assert out[r].item() == pytest.approx(ref_kd(row, ids[r].tolist(), tlp[r].tolist(), tail[r].item()), abs=1e-12)
        grad = ref_kd_grad(row, ids[r].tolist(), tlp[r].tolist(), tail[r].item())
        for v in range(V):
            assert s.grad[r, v].item() == pytest.approx(grad[v], abs=1e-12)


def test_kd_with_the_stored_tail_is_the_kl_of_renormalised_bins():
    _, ids, tlp = make_teacher()
    s = rand(R, V, seed=52, scale=2)
    # quantised like a store: top-K and tail to 1/128 nat; the K+1 bins then sum to 1 only roughly
    q_top = torch.round(tlp * 128) / 128
    q_tail = torch.round(torch.log(1 - tlp.exp().sum(-1)) * 128) / 128
    sums = q_top.exp().sum(-1) + q_tail.exp()
    assert ((sums - 1).abs() > 1e-5).all()
    bins = L.teacher_kd_bins(q_top, q_tail)
    torch.testing.assert_close(bins.exp().sum(-1), torch.ones(R, dtype=torch.float64), rtol=0, atol=1e-14)
    for r in range(R):
        for k in range(K):
            assert bins[r, k].item() == pytest.approx(q_top[r, k].item() - math.log(sums[r].item()), abs=1e-13)
        assert bins[r, K].item() == pytest.approx(q_tail[r].item() - math.log(sums[r].item()), abs=1e-13)
    out = L.kd_tail_kl(s, ids, q_top, q_tail)
    for r in range(R):
        assert out[r].item() == pytest.approx(ref_kd(s[r].tolist(), ids[r].tolist(), q_top[r].tolist(),
                                                     q_tail[r].item()), abs=1e-12)
    # per row: a stored tail where has_tail, the tail from the top-K elsewhere (a store without tail_logp)
    has = torch.tensor([True, False] * 3 + [True])
    mixed = L.teacher_kd_bins(q_top, q_tail, has)
    fallback = L.teacher_kd_bins(q_top)
    torch.testing.assert_close(mixed[has], bins[has], rtol=0, atol=0)
    torch.testing.assert_close(mixed[~has], fallback[~has], rtol=0, atol=0)
    for r in range(R):
        tail = 1.0 - math.fsum(math.exp(x) for x in q_top[r].tolist())
        assert fallback[r, K].item() == pytest.approx(math.log(tail) - math.log(math.fsum(
            [math.exp(x) for x in q_top[r].tolist()] + [tail])), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_empty_teacher_tail(dtype):
    """A teacher whose top-K holds all its mass: the tail bin contributes nothing, stored as -inf, at the store's
    floor (-500), or left to the top-K (which sum to 1)."""
    s = rand(R, V, seed=53, dtype=dtype).requires_grad_(True)
    ids = torch.arange(K).expand(R, K).contiguous()
    tlp = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)).expand(R, K).contiguous()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for tail in (torch.full((R,), -math.inf, dtype=dtype), torch.full((R,), -500.0, dtype=dtype), None):
        out = L.kd_tail_kl(s, ids, tlp.to(dtype), tail)
        grad, = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        for r in range(R):
            row = s[r].detach().double().tolist()
            lse = ref_logsumexp(row)
            expected = math.fsum(p * (math.log(p) - (row[k] - lse)) for k, p in enumerate([0.5, 0.3, 0.2]))
            assert out[r].item() == pytest.approx(expected, abs=tol)
            # no teacher mass in the tail: d KD / d logit = q_v outside the ids
            for v in range(K, V):
                assert grad[r, v].item() == pytest.approx(math.exp(row[v] - lse), abs=tol)


def covering_teacher():
    """A teacher whose top-K is the whole vocabulary (K = V), kept as a format-1 store keeps it: log-probs
    rounded to 1/128 nat and no stored tail, so that ``1 - sum_k p_k`` is rounding noise, positive on some rows
    and negative on others; its ids in the teacher's order."""
    t_logits = rand(R, V, seed=58, scale=2)
    top, ids = torch.log_softmax(t_logits, -1).topk(V, dim=-1)
    quantised = torch.round(top * 128) / 128
    sums = quantised.exp().sum(-1)
    assert (sums < 1 - 1e-4).any() and (sums > 1 + 1e-4).any()
    return ids, quantised


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_with_k_equal_to_the_vocabulary_and_no_stored_tail_is_the_kl_over_the_k_ids(dtype):
    """K = V without a stored tail: the tail bin holds no id, so neither model has mass there, whatever the
    rounded top-K leaves for it; the KD term is the KL of the teacher's K log-probs (renormalised) to the student's
    softmax, finite, its gradient q_v - p_v. Unchunked (autograd), chunked with the analytic gradient and without."""
    ids, tlp = covering_teacher()
    logits = rand(R, V, seed=59, scale=3).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    expected, expected_grad = [], []
    for r in range(R):
        row = logits[r].double().tolist()
        lse = ref_logsumexp(row)
        weights = [math.exp(t) for t in tlp[r].tolist()]
        p = {int(v): w / math.fsum(weights) for v, w in zip(ids[r].tolist(), weights)}
        expected.append(math.fsum(p[v] * (math.log(p[v]) - (row[v] - lse)) for v in range(V)))
        expected_grad.append([math.exp(row[v] - lse) - p[v] for v in range(V)])

    x = logits.clone().requires_grad_(True)
    values = {"autograd": L.kd_tail_kl(x, ids, tlp.to(dtype))}
    for analytic in (True, False):
        values[f"chunked, analytic={analytic}"] = L.chunked_token_terms(
            x, lambda h: h, ["kd"], {L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp.to(dtype))},
            chunk_size=3, analytic=analytic)["kd"]
    for how, out in values.items():
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), how
        for r in range(R):
            assert out[r].item() == pytest.approx(expected[r], abs=tol), (how, r)
            for v in range(V):
                assert grad[r, v].item() == pytest.approx(expected_grad[r][v], abs=tol), (how, r, v)


def test_kd_huge_logits_float32_matches_float64_literal():
    """Logits of magnitude 1e4 (a saturated student): every probability outside one id underflows float32's
    exp, the log-space tail does not."""
    _, ids, tlp = make_teacher()
    logits = rand(R, V, seed=54, scale=1e4)
    x = logits.float().requires_grad_(True)
    out = L.kd_tail_kl(x, ids, tlp.float())
    grad, = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    for r in range(R):
        row = logits[r].float().double().tolist()  # the float32 inputs, exactly
        expected = ref_kd(row, ids[r].tolist(), tlp[r].tolist())
        assert out[r].item() == pytest.approx(expected, rel=1e-5)
        reference = ref_kd_grad(row, ids[r].tolist(), tlp[r].tolist())
        for v in range(V):
            assert grad[r, v].item() == pytest.approx(reference[v], abs=1e-6)


def test_student_tail_logmass_value_gradient_and_repeated_ids():
    s = rand(R, V, seed=55, scale=3).requires_grad_(True)
    ls = torch.log_softmax(s, -1)
    ids = torch.tensor([[0, 4, 4], [1, 2, 3], [10, 9, 8], [5, 5, 5], [0, 1, 2], [7, 3, 0], [6, 2, 9]])
    out = L.student_tail_logmass(ls, ids)
    for r in range(R):
        row = ls[r].tolist()
        assert out[r].item() == pytest.approx(ref_logsumexp(x for v, x in enumerate(row) if v not in ids[r].tolist()),
                                              abs=1e-12)
    assert torch.autograd.gradcheck(lambda x: L.student_tail_logmass(torch.log_softmax(x, -1), ids), (s,))
    every = torch.arange(V).expand(2, V).contiguous()  # K = V: nothing outside, -inf, gradient 0
    x = rand(2, V, seed=56).requires_grad_(True)
    tail = L.student_tail_logmass(torch.log_softmax(x, -1), every)
    assert (tail == -math.inf).all()
    (grad,) = torch.autograd.grad(tail.clamp(min=-1e3).sum() + 0 * x.sum(), x)
    assert torch.isfinite(grad).all()


def test_kd_gradcheck_with_stored_tail():
    _, ids, tlp = make_teacher()
    tail = torch.log(1 - tlp.exp().sum(-1)) - 0.01
    s = rand(R, V, seed=57).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.kd_tail_kl(x, ids, tlp, tail), (s,))


def test_adpa_advantage_clipped_vs_unclipped():
    tlp = rand(R, K, seed=8, scale=2)
    rlp = rand(R, K, seed=9, scale=2)
    a_raw = L.adpa_advantage(tlp, rlp, beta=0.7, clip=False)
    a_clip = L.adpa_advantage(tlp, rlp, beta=0.7, clip=True)
    any_neg = any_big = False
    for r in range(R):
        for k in range(K):
            raw = 0.7 * (tlp[r, k].item() - rlp[r, k].item())
            assert a_raw[r, k].item() == pytest.approx(raw, abs=1e-12)
            expected = min(max(raw, 1e-8), 1 - 1e-8)
            assert a_clip[r, k].item() == pytest.approx(expected, abs=1e-15)
            any_neg |= raw < 0
            any_big |= raw > 1
    assert any_neg and any_big  # the case exercises both clip sides
    assert (a_clip[a_raw < 0] == 1e-8).all()  # negatives zeroed (to 1e-8)
    assert (a_raw < 0).any() and not (a_clip < 0).any()


def test_adpa_token_loss_matches_literal_and_detaches_advantage():
    _, ids, tlp = make_teacher()
    s = rand(R, V, seed=10, scale=2)
    adv = rand(R, K, seed=11).requires_grad_(True)
    out = L.adpa_token_loss(s, ids, adv)
    for r in range(R):
        q = ref_softmax(s[r].tolist())
        ref = -sum(q[ids[r, k].item()] * adv[r, k].item() for k in range(K))
        assert out[r].item() == pytest.approx(ref, abs=1e-12)
    assert not out.requires_grad  # only the (non-grad) student logits can carry grad


# --------------------------------------------------------------------------
# sequence level
# --------------------------------------------------------------------------


def test_dpo_loss_numbers():
    pc = torch.tensor([-10.0, -5.0, -300.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -5.0, -10.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -6.0, -10.0], dtype=torch.float64)
    rr = torch.tensor([-11.0, -4.0, -300.0], dtype=torch.float64)
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    for b in range(3):
        z = 0.1 * ((pc[b] - rc[b]) - (pr[b] - rr[b])).item()
        assert out[b].item() == pytest.approx(-ref_logsigmoid(z), rel=1e-12)
    # hand number: margin 2, beta 0.1 -> log(1 + e^-0.2)
    assert out[0].item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)
    assert out[2].item() == pytest.approx(58.0, rel=1e-9)  # large margin: stable, ~ -z
    assert torch.isfinite(out).all()


def test_simpo_loss_numbers():
    c = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    r = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    out = L.simpo_loss(c, r, beta=2.0, gamma=0.5)
    for b in range(3):
        z = 2.0 * c[b].item() - 2.0 * r[b].item() - 0.5
        assert out[b].item() == pytest.approx(-ref_logsigmoid(z), rel=1e-12)
    # hand number: 2*(-1) - 2*(-1.5) - 0.5 = 0.5 -> log(1 + e^-0.5)
    assert out[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-12)
    # equal responses: loss = log(1 + e^gamma) > log 2 (the margin pushes)
    assert out[2].item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-12)


def test_sequence_sums_and_means_with_mask():
    vals = rand(10, seed=12)
    idx = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 1, 2])
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    vals_nan = vals.clone()
    vals_nan[2] = float("nan")  # masked tokens must not leak NaN
    S = 4  # sequence 3 has no tokens
    sums = L.sequence_sums(vals_nan, idx, S, mask=mask)
    means = L.sequence_means(vals_nan, idx, S, mask=mask)
    for s in range(S):
        toks = [vals[i].item() for i in range(10) if idx[i] == s and mask[i]]
        assert sums[s].item() == pytest.approx(sum(toks), abs=1e-12)
        assert means[s].item() == pytest.approx(sum(toks) / len(toks) if toks else 0.0, abs=1e-12)
    # without mask
    sums_nm = L.sequence_sums(vals, idx, S)
    means_nm = L.sequence_means(vals, idx, S)
    for s in range(S):
        toks = [vals[i].item() for i in range(10) if idx[i] == s]
        assert sums_nm[s].item() == pytest.approx(sum(toks), abs=1e-12)
        assert means_nm[s].item() == pytest.approx(sum(toks) / len(toks) if toks else 0.0, abs=1e-12)
    # differentiable: d mean_s / d v_i = mask_i / n_s
    v = vals.clone().requires_grad_(True)
    L.sequence_means(v, idx, S, mask=mask).sum().backward()
    expected = torch.tensor([0.5, 0.5, 0, 0.5, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(v.grad, expected)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------


def test_gradcheck_every_loss():
    _, ids, tlp = make_teacher()
    adv = L.adpa_advantage(tlp, rand(R, K, seed=13), clip=False)
    tgt = ids[:, 1]
    s = rand(R, V, seed=14).requires_grad_(True)
    b4 = [rand(4, seed=20 + i).requires_grad_(i < 2) for i in range(4)]  # refs are constants
    rs = rand(3, 4, seed=30, scale=2).requires_grad_(True)
    rt = rand(3, 4, seed=31, scale=2)
    rs8 = rand(2, 8, seed=32, scale=2).requires_grad_(True)
    rt8 = rand(2, 8, seed=33, scale=2)
    idx = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    checks = [
        (lambda x: L.token_logprobs(x, tgt), (s,)),
        (lambda x: L.kd_tail_kl(x, ids, tlp), (s,)),
        (lambda x: L.adpa_token_loss(x, ids, adv), (s,)),
        (lambda a, b: L.dpo_loss(a, b, b4[2], b4[3], beta=0.5), tuple(b4[:2])),
        (lambda a, b: L.simpo_loss(a, b), tuple(b4[:2])),
        (lambda x: L.sequence_means(x, idx, 3), (rand(7, seed=40).requires_grad_(True),)),
        (lambda x: L.plackett_luce_log_probs(x), (rs,)),
        (lambda x: L.pad_ppd_loss(x, rt), (rs,)),
        (lambda x: L.pad_vpd_loss(x, rt), (rs,)),
        (lambda x: L.pad_loss(x, rt8, kind="ppd"), (rs8,)),
        (lambda x: L.pad_loss(x, rt8, kind="vpd"), (rs8,)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args, fast_mode=True), fn
        out = fn(*args)
        grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradients_finite_float32_random():
    _, ids, tlp = make_teacher(dtype=torch.float32)
    s = rand(R, V, seed=15, scale=5, dtype=torch.float32).requires_grad_(True)
    adv = L.adpa_advantage(tlp, rand(R, K, seed=16, dtype=torch.float32))
    total = (
        L.kd_tail_kl(s, ids, tlp).sum()
        + L.adpa_token_loss(s, ids, adv).sum()
        - L.token_logprobs(s, ids[:, 0]).sum()
    )
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# PAD / Plackett-Luce
# --------------------------------------------------------------------------


def test_permutations_tensor_lexicographic_and_limit():
    for n in range(1, 5):
        p = L.permutations_tensor(n)
        assert p.dtype == torch.long
        assert [tuple(row) for row in p.tolist()] == list(itertools.permutations(range(n)))
    assert L.permutations_tensor(6).shape == (720, 6)
    with pytest.raises(ValueError, match="decompos"):
        L.permutations_tensor(7)
    with pytest.raises(ValueError, match="decompos"):
        L.plackett_luce_log_probs(torch.zeros(1, 7))


def test_plackett_luce_matches_enumeration_and_sums_to_one():
    r = rand(3, 4, seed=17, scale=2)
    lp = L.plackett_luce_log_probs(r)
    assert lp.shape == (3, 24)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    for g in range(3):
        for col, tau in enumerate(itertools.permutations(range(4))):
            assert lp[g, col].item() == pytest.approx(math.log(ref_pl_prob(r[g].tolist(), tau)), abs=1e-12)
    r6 = rand(2, 6, seed=18, scale=3)
    torch.testing.assert_close(
        L.plackett_luce_log_probs(r6).exp().sum(-1), torch.ones(2, dtype=torch.float64)
    )


def test_ppd_jsd_matches_literal_symmetric_zero_and_bounded():
    rs = rand(3, 4, seed=19, scale=2)
    rt = rand(3, 4, seed=21, scale=2)
    out = L.pad_ppd_loss(rs, rt)
    for g in range(3):
        assert out[g].item() == pytest.approx(ref_jsd(rs[g].tolist(), rt[g].tolist()), abs=1e-12)
    torch.testing.assert_close(out, L.pad_ppd_loss(rt, rs))
    assert L.pad_ppd_loss(rs, rs.clone()).abs().max().item() < 1e-14
    # JSD of (nearly) disjoint distributions approaches ln 2 from below
    far_s = torch.tensor([[0.0, 40.0, 80.0]], dtype=torch.float64)
    far_t = torch.tensor([[80.0, 40.0, 0.0]], dtype=torch.float64)
    v = L.pad_ppd_loss(far_s, far_t).item()
    assert v <= LN2 + 1e-12
    assert v == pytest.approx(LN2, abs=1e-9)
    mid = L.pad_ppd_loss(far_s / 20, far_t / 20).item()
    assert 0 < mid < v


def test_ppd_teacher_side_detached():
    rs = rand(2, 3, seed=22).requires_grad_(True)
    rt = rand(2, 3, seed=23).requires_grad_(True)
    L.pad_ppd_loss(rs, rt).sum().backward()
    assert rt.grad is None and rs.grad is not None


def test_vpd_is_minus_log_prob_of_teacher_order():
    rs = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    rt = torch.tensor([[5.0, 1.0, 3.0, -2.0], [0.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    out = L.pad_vpd_loss(rs, rt)
    # hand: teacher order row 0 = (0, 2, 1, 3)
    e = [math.exp(x) for x in rs[0].tolist()]
    by_hand = -(
        math.log(e[0] / (e[0] + e[1] + e[2] + e[3]))
        + math.log(e[2] / (e[1] + e[2] + e[3]))
        + math.log(e[1] / (e[1] + e[3]))
    )
    assert out[0].item() == pytest.approx(by_hand, abs=1e-12)
    # uniform student rewards: every ordering has prob 1/4!
    assert out[1].item() == pytest.approx(math.log(24), abs=1e-12)
    for g in range(2):
        assert out[g].item() == pytest.approx(ref_vpd(rs[g].tolist(), rt[g].tolist()), abs=1e-12)


def test_pad_loss_small_n_is_exact():
    rs = rand(3, 5, seed=24)
    rt = rand(3, 5, seed=25)
    torch.testing.assert_close(L.pad_loss(rs, rt, "ppd"), L.pad_ppd_loss(rs, rt))
    torch.testing.assert_close(L.pad_loss(rs, rt, "vpd"), L.pad_vpd_loss(rs, rt))
    with pytest.raises(ValueError):
        L.pad_loss(rs, rt, "nope")


def test_pad_vpd_n8_is_exact_minus_log_prob_of_the_teachers_order():
    """VPD is never decomposed: for n = 8 > max_group it is -log P_S(argsort r_T), for every max_group."""
    n = 8
    rs = rand(3, n, seed=26, scale=2).requires_grad_(True)
    rt = rand(3, n, seed=27, scale=2)
    rt[2, 5] = rt[2, 1]  # a tie in the teacher's rewards: the lower index ranks first
    for m in range(2, L.MAX_EXACT_PL_GROUP + 1):
        out = L.pad_loss(rs, rt, kind="vpd", max_group=m)
        for g in range(3):
            r = rs[g].tolist()
            order = sorted(range(n), key=lambda i: (-float(rt[g, i]), i))  # argsort r_T, descending, stable
            # Plackett-Luce product formula: P(order) = prod_k exp(r_{order_k}) / sum_{j not yet ranked} exp(r_j)
            prob = 1.0
            for k in range(n):
                prob *= math.exp(r[order[k]]) / sum(math.exp(r[j]) for j in order[k:])
            assert out[g].item() == pytest.approx(-math.log(prob), rel=1e-12, abs=1e-12), (m, g)
    # its gradient: d(-log P)/d r_i = sum_{k <= rank of i} exp(r_i) / sum_{j in order[k:]} exp(r_j) - 1
    out.sum().backward()
    for g in range(3):
        r = rs[g].tolist()
        order = sorted(range(n), key=lambda i: (-float(rt[g, i]), i))
        for rank, i in enumerate(order):
            expected = sum(math.exp(r[i]) / sum(math.exp(r[j]) for j in order[k:]) for k in range(rank + 1)) - 1
            assert rs.grad[g, i].item() == pytest.approx(expected, abs=1e-12)


def test_pad_ppd_decomposition_n8_equals_average_over_teacher_windows():
    # PPD only: VPD is exact for any n (test above)
    n, m = 8, 6
    rs = rand(3, n, seed=26, scale=2).requires_grad_(True)
    rt = rand(3, n, seed=27, scale=2)
    out = L.pad_loss(rs, rt, kind="ppd", max_group=m)
    assert out.shape == (3,) and torch.isfinite(out).all()
    for g in range(3):
        order = ref_teacher_order(rt[g].tolist())
        windows = [order[0:6], order[2:8]]  # stride 5; last window shifted to end at n-1
        vals = [
            ref_jsd([rs[g, i].item() for i in w], [rt[g, i].item() for i in w]) for w in windows
        ]
        assert out[g].item() == pytest.approx(sum(vals) / len(vals), abs=1e-10)
    out.sum().backward()
    assert torch.isfinite(rs.grad).all()
    # equal rewards -> zero PPD after decomposition as well
    assert L.pad_loss(rt, rt, kind="ppd").abs().max().item() < 1e-14


def test_pad_decomposition_windows_chain_connected():
    # n=11, m=4: stride 3, windows [0..3], [3..6], [6..9] and the last shifted to [7..10]
    n, m = 11, 4
    rs = rand(1, n, seed=28)
    rt = torch.arange(n, 0, -1, dtype=torch.float64).unsqueeze(0)  # teacher order = 0..10
    out = L.pad_loss(rs, rt, kind="ppd", max_group=m)
    windows = [list(range(0, 4)), list(range(3, 7)), list(range(6, 10)), list(range(7, 11))]
    vals = [ref_jsd([rs[0, i].item() for i in w], [rt[0, i].item() for i in w]) for w in windows]
    assert out.item() == pytest.approx(sum(vals) / 4, abs=1e-12)


def test_mcq_score_and_teacher_rewards():
    g = torch.Generator().manual_seed(29)
    P = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    P = torch.where(torch.eye(4, dtype=torch.bool), torch.full_like(P, float("nan")), P)
    s = L.mcq_score(P, eps=1e-3)
    for b in range(2):
        for i in range(4):
            wins = sum(P[b, i, j].item() for j in range(4) if j != i)
            assert s[b, i].item() == pytest.approx(math.log((1e-3 + wins) / 3), abs=1e-12)
    # a response that never wins gets log(eps / (n - 1)), finite
    Z = torch.zeros(1, 3, 3, dtype=torch.float64)
    assert L.mcq_score(Z, eps=1e-8)[0, 0].item() == pytest.approx(math.log(1e-8 / 2), rel=1e-12)
    ml = rand(2, 4, seed=30)
    r = L.pad_teacher_rewards(ml, s, alpha=0.3, beta=10.0)
    for b in range(2):
        for i in range(4):
            expected = 10.0 * (0.3 * ml[b, i].item() + 0.7 * s[b, i].item())
            assert r[b, i].item() == pytest.approx(expected, abs=1e-12)
    ml_inf = torch.full((2, 4), -float("inf"), dtype=torch.float64)
    r0 = L.pad_teacher_rewards(ml_inf, s, alpha=0.0)
    torch.testing.assert_close(r0, 10.0 * s)


# --------------------------------------------------------------------------
# chunked
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_terms_equals_unchunked(with_bias):
    _, ids, tlp = make_teacher()
    adv = L.adpa_advantage(tlp, rand(R, K, seed=34), clip=False)
    tgt = ids[:, 2]

    def leaves():
        h = rand(R, H, seed=35).requires_grad_(True)
        w = rand(V, H, seed=36).requires_grad_(True)
        b = rand(V, seed=37).requires_grad_(True) if with_bias else None
        return h, w, b

    h1, w1, b1 = leaves()
    logits = h1 @ w1.T + (b1 if with_bias else 0)
    ref = {
        "logp": L.token_logprobs(logits, tgt),
        "kd": L.kd_tail_kl(logits, ids, tlp),
        "adpa": L.adpa_token_loss(logits, ids, adv),
    }
    coef = rand(3, R, seed=38)
    sum(((c * ref[k]).sum() for c, k in zip(coef, ["logp", "kd", "adpa"]))).backward()

    h2, w2, b2 = leaves()
    out = L.chunked_token_terms(h2, lambda h: torch.nn.functional.linear(h, w2, b2), ["logp", "kd", "adpa"],
                                {L.TARGET_IDS: tgt, L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp),
                                 L.ADVANTAGE: adv}, chunk_size=3)
    assert set(out) == {"logp", "kd", "adpa"}
    for k in out:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12)
    sum(((c * out[k]).sum() for c, k in zip(coef, ["logp", "kd", "adpa"]))).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-12, atol=1e-12)
    if with_bias:
        torch.testing.assert_close(b2.grad, b1.grad, rtol=1e-12, atol=1e-12)

    # optional terms: only what was asked for; no-grad path gives the same values
    only_logp = L.chunked_token_terms(h2.detach(), lambda h: torch.nn.functional.linear(h, w2.detach(), b2), ["logp"],
                                      {L.TARGET_IDS: tgt}, chunk_size=4)
    assert set(only_logp) == {"logp"}
    torch.testing.assert_close(only_logp["logp"], ref["logp"].detach())
    with torch.no_grad():
        kd_only = L.chunked_token_terms(h2, lambda h: torch.nn.functional.linear(h, w2, b2), ["logp", "kd"],
                                        {L.TARGET_IDS: tgt, L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp)},
                                        chunk_size=2)
    assert set(kd_only) == {"logp", "kd"}
    torch.testing.assert_close(kd_only["kd"], ref["kd"].detach())


def test_chunked_token_terms_does_not_keep_logits_for_backward():
    _, ids, tlp = make_teacher()
    h = rand(R, H, seed=39).requires_grad_(True)
    w = rand(V, H, seed=40).requires_grad_(True)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = L.chunked_token_terms(h, lambda rows: rows @ w.T, ["logp", "kd"],
                                    {L.TARGET_IDS: ids[:, 0], L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp)},
                                    chunk_size=3)
    assert not any(len(s) == 2 and s[1] == V and s[0] <= 3 for s in saved_shapes), saved_shapes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        L.kd_tail_kl(h @ w.T, ids, tlp)  # sanity: the unchunked path does save [R, V]
    assert (R, V) in saved_shapes
    (out["logp"].sum() + out["kd"].sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def extreme_rows(dtype):
    """Student logits [R, V] with every extreme of the chunked pass's backward, the teacher's ids, log-probs and
    exact tail: a saturated row (logits of 1e4), a student near-certain of a teacher id (its tail ~ -1e4, so
    exp(-tail) is beyond even float64's range), a flat row, a teacher with an empty tail, ordinary rows."""
    _, ids, tlp = make_teacher()
    logits = rand(R, V, seed=80, scale=3)
    logits[0] = rand(V, seed=81, scale=1e4)
    logits[1, ids[1, 0]] += 1e4
    logits[2] = rand(V, seed=82, scale=1e-3)
    tail = torch.log1p(-tlp.exp().sum(-1))
    tail[3] = -math.inf
    return logits.to(dtype), ids, tlp, tail


def test_chunked_kd_value_and_gradient_at_the_extremes_match_the_literal():
    logits, ids, tlp, tail = extreme_rows(torch.float64)
    x = logits.clone().requires_grad_(True)
    out = L.chunked_token_terms(x, lambda h: h, ["kd"], {L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp, tail)},
                                chunk_size=3)["kd"]
    (grad,) = torch.autograd.grad(out.sum(), x)
    for r in range(R):
        row, k_ids, t_row = logits[r].tolist(), ids[r].tolist(), tlp[r].tolist()
        assert out[r].item() == pytest.approx(ref_kd(row, k_ids, t_row, tail[r].item()), rel=1e-9, abs=1e-12)
        reference = ref_kd_grad(row, k_ids, t_row, tail[r].item())
        for v in range(V):
            assert grad[r, v].item() == pytest.approx(reference[v], abs=1e-12), (r, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_terms_gradient_equals_autograds_at_the_extremes(dtype):
    """logp, kd and adpa in one pass over the extreme rows, targets inside and outside the teacher's ids, some ids
    repeated: the chunked pass's own backward equals autograd through the unchunked functions (in float64), and is
    as close as autograd's to float64 truth in float32 and bf16 (at logits of 1e4, float32's log-softmax itself
    is off by ~1e-5 on the near-certain row, in either path)."""
    logits, ids, tlp, tail = extreme_rows(dtype)
    ids = ids.clone()
    ids[5, 2] = ids[5, 1]  # a repeated id: its gradient entries add up
    tgt = torch.where(torch.arange(R) % 2 == 0, ids[:, 0], (ids[:, 0] + 1) % V)
    tgt[1] = (ids[1] + 1).max() % V if bool((ids[1] + 1 != ids[1, 0]).all()) else tgt[1]
    adv = L.adpa_advantage(tlp, rand(R, K, seed=83), clip=False)
    bins = L.teacher_kd_bins(tlp, tail)
    coef = rand(3, R, seed=84)

    def unchunked(x):
        x = x.clone().requires_grad_(True)
        values = [L.token_logprobs(x, tgt), L.kd_tail_kl(x, ids, tlp, tail), L.adpa_token_loss(x, ids, adv)]
        return values, torch.autograd.grad(sum((c.to(v.dtype) * v).sum() for c, v in zip(coef, values)), x)[0]

    ref, grad1 = unchunked(logits)
    x2 = logits.clone().requires_grad_(True)
    out = L.chunked_token_terms(x2, lambda h: h, ["logp", "kd", "adpa"],
                                {L.TARGET_IDS: tgt, L.TOPK_IDS: ids, L.KD_TEACHER: bins, L.ADVANTAGE: adv}, chunk_size=4)
    (grad2,) = torch.autograd.grad(sum((c * out[name]).sum() for c, name in zip(coef, ["logp", "kd", "adpa"])), x2)
    assert torch.isfinite(grad2).all()
    if dtype == torch.float64:
        for name, value in zip(["logp", "kd", "adpa"], ref):
            torch.testing.assert_close(out[name], value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad2, grad1, rtol=1e-12, atol=1e-12)
        return
    for name, value in zip(["logp", "kd", "adpa"], ref):
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5)
    truth = unchunked(logits.double())[1]
    autograd_error, chunked_error = (grad1.double() - truth).abs().max(), (grad2.double() - truth).abs().max()
    assert chunked_error <= 4 * autograd_error + 1e-7, (chunked_error, autograd_error)


def test_the_terms_of_today_keep_their_analytic_gradients():
    """logp, kd and adpa keep their gradients written out (step time); a new term may leave it to autograd."""
    assert all(L.TOKEN_TERMS[name].with_gradient is not None for name in (L.LOGP, L.KD, L.ADPA))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", [name for name, term in L.TOKEN_TERMS.items() if term.with_gradient is not None])
def test_each_analytic_gradient_equals_autograds_of_its_value(name, dtype):
    """Every per-token term with its gradient written out (``with_gradient``) against autograd's gradient of its
    ``value`` (``analytic=False``), on the extreme rows, each term on scattered rows of its own and alone in its
    pass: the same values and gradients (float64: to 1e-12; float32: as close to float64 truth as autograd's)."""
    logits, ids, tlp, tail = extreme_rows(dtype)
    ids = ids.clone()
    ids[5, 2] = ids[5, 1]  # a repeated id
    signals = {L.TARGET_IDS: torch.where(torch.arange(R) % 2 == 0, ids[:, 0], (ids[:, 0] + 1) % V),
               L.TOPK_IDS: ids, L.KD_TEACHER: L.teacher_kd_bins(tlp, tail),
               L.ADVANTAGE: L.adpa_advantage(tlp, rand(R, K, seed=85), clip=False)}
    # kd_sampled's tail samples: ids outside the row's top-K (one repeated), their log-probs under a stand-in teacher
    samples = torch.stack([torch.tensor([v for v in range(V) if v not in ids[r].tolist()][:4]) for r in range(R)])
    samples[:, 3] = samples[:, 0]
    signals[L.TAIL_SAMPLE_IDS] = samples
    signals[L.KD_SAMPLE_TEACHER] = L.teacher_kd_sample_logp(tlp, tail, rand(R, 4, seed=87) - 6.0)
    rows = {name: torch.tensor([True, True, False, True, True, False, True])}
    coef = rand(R, seed=86)

    def chunked(x, analytic):
        x = x.clone().requires_grad_(True)
        out = L.chunked_token_terms(x, lambda h: h, [name], signals, chunk_size=3, rows=rows,
                                    analytic=analytic)[name]
        return out, torch.autograd.grad((coef.to(out.dtype) * out).sum(), x)[0]

    (fast, fast_grad), (slow, slow_grad) = chunked(logits, True), chunked(logits, False)
    assert torch.isfinite(fast_grad).all() and torch.isfinite(slow_grad).all()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    if dtype == torch.float64:
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-12, atol=1e-12)
        return
    truth = chunked(logits.double(), False)[1]
    autograd_error, analytic_error = (slow_grad.double() - truth).abs().max(), (fast_grad.double() - truth).abs().max()
    assert analytic_error <= 4 * autograd_error + 1e-7, (analytic_error, autograd_error)


# --------------------------------------------------------------------------
# adaptive K (a store written with --top-p): per-row kept counts, padding past them
# --------------------------------------------------------------------------

KA, VA = 6, 40
COUNTS = [1, 6, 3, 2, 1, 6, 4]  # kept entries per row: both extremes (1 and K) included


def adaptive_teacher(seed=60):
    """Float64 teacher rows with an adaptive K: (ids [R, KA] and log-probs [R, KA], padded past COUNTS with id 0 and
    -500 as a store pads them; the kept ids and log-probs as plain lists; the exact tail outside the kept ids)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(COUNTS), VA, generator=g, dtype=torch.float64) * 2
    logits[2, 0] += 8.0  # id 0 is a kept id of row 2: padding (id 0 too) must not be confused with it
    logits[4, 7] += 12.0  # a confident row, k = 1: the tail holds ~1e-4
    logp = torch.log_softmax(logits, -1)
    top, ids = logp.topk(KA, dim=-1)
    kept_ids, kept_logp, tails = [], [], []
    for r, n in enumerate(COUNTS):
        kept_ids.append(ids[r, :n].tolist())
        kept_logp.append(top[r, :n].tolist())
        tails.append(ref_logsumexp(x for v, x in enumerate(logp[r].tolist()) if v not in kept_ids[-1]))
    count = torch.tensor(COUNTS)
    keep = torch.arange(KA) < count[:, None]
    padded_ids = torch.where(keep, ids, torch.zeros_like(ids))
    padded_logp = torch.where(keep, top, torch.full_like(top, -500.0))
    return padded_ids, padded_logp, torch.tensor(tails, dtype=torch.float64), count, kept_ids, kept_logp


def test_kept_entries_and_kept_ids():
    ids, _, _, count, kept_ids, _ = adaptive_teacher()
    kept = L.kept_entries(count, KA)
    for r, n in enumerate(COUNTS):
        assert kept[r].tolist() == [j < n for j in range(KA)]
        replaced = L.kept_ids(ids, kept)[r].tolist()
        assert replaced[:n] == kept_ids[r] and replaced[n:] == [kept_ids[r][0]] * (KA - n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_with_counts_is_the_kl_over_kept_bins_and_the_exact_tail(dtype):
    ids, top, tail, count, kept_ids, kept_logp = adaptive_teacher()
    s = rand(len(COUNTS), VA, seed=61, scale=2)
    s[0, kept_ids[0][0]] += 40.0  # row 0 (k = 1): a student with all but ~1e-16 of its mass on the kept id
    x = s.to(dtype).requires_grad_(True)
    out = L.kd_tail_kl(x, ids, top.to(dtype), tail.to(dtype), count)
    grad, = torch.autograd.grad(out.sum(), x)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for r in range(len(COUNTS)):
        row = x[r].detach().double().tolist()
        expected = ref_kd(row, kept_ids[r], kept_logp[r], tail[r].item())  # n + 1 bins, literally
        assert out[r].item() == pytest.approx(expected, rel=tol, abs=tol)
        reference = ref_kd_grad(row, kept_ids[r], kept_logp[r], tail[r].item())
        for v in range(VA):
            assert grad[r, v].item() == pytest.approx(reference[v], abs=tol)
    assert out[0].item() > 1.0  # row 0: the teacher's tail (~0.8) against the student's ~1e-16, not lost
    # the padding takes no part: any ids and log-probs there give the same values and gradients
    g = torch.Generator().manual_seed(62)
    keep = L.kept_entries(count, KA)
    noisy_ids = torch.where(keep, ids, torch.randint(0, VA, ids.shape, generator=g))
    noisy_top = torch.where(keep, top, -torch.rand(top.shape, generator=g, dtype=torch.float64))
    again = L.kd_tail_kl(x, noisy_ids, noisy_top.to(dtype), tail.to(dtype), count)
    grad_again, = torch.autograd.grad(again.sum(), x)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_again, grad, rtol=0, atol=0)
    # all K kept (counts = K) is today's KD
    full = torch.full((len(COUNTS),), KA)
    _, all_ids = torch.log_softmax(rand(len(COUNTS), VA, seed=63), -1).topk(KA, -1)
    torch.testing.assert_close(L.kd_tail_kl(x, all_ids, top.to(dtype), tail.to(dtype), full),
                               L.kd_tail_kl(x, all_ids, top.to(dtype), tail.to(dtype)), rtol=0, atol=0)


def test_kd_with_counts_quantised_teacher_renormalises_the_kept_bins():
    ids, top, tail, count, kept_ids, kept_logp = adaptive_teacher(seed=64)
    q_top = torch.where(L.kept_entries(count, KA), torch.round(top * 128) / 128, top)  # padding stays at the floor
    q_tail = torch.round(tail * 128) / 128
    bins = L.teacher_kd_bins(q_top, q_tail, kept=L.kept_entries(count, KA))
    s = rand(len(COUNTS), VA, seed=65, scale=2)
    out = L.kd_tail_kl(s, ids, q_top, q_tail, count)
    for r, n in enumerate(COUNTS):
        stored = [math.exp(v) for v in q_top[r, :n].tolist()] + [math.exp(q_tail[r].item())]
        total = math.fsum(stored)
        for j in range(n):
            assert bins[r, j].item() == pytest.approx(math.log(stored[j] / total), abs=1e-13)
        assert all(b == -math.inf for b in bins[r, n:KA].tolist())
        assert bins[r, KA].item() == pytest.approx(math.log(stored[-1] / total), abs=1e-13)
        assert out[r].item() == pytest.approx(ref_kd(s[r].tolist(), kept_ids[r], q_top[r, :n].tolist(),
                                                     q_tail[r].item()), abs=1e-12)


def test_adpa_with_counts_ignores_the_padding():
    ids, top, _, count, kept_ids, _ = adaptive_teacher(seed=66)
    ref = torch.where(L.kept_entries(count, KA), top + rand(len(COUNTS), KA, seed=67), torch.zeros_like(top))
    kept = L.kept_entries(count, KA)
    s = rand(len(COUNTS), VA, seed=68, scale=2).requires_grad_(True)
    for clip in (True, False):
        adv = L.adpa_advantage(top, ref, beta=0.8, clip=clip, kept=kept)
        out = L.adpa_token_loss(s, L.kept_ids(ids, kept), adv)
        grad, = torch.autograd.grad(out.sum(), s)
        for r, n in enumerate(COUNTS):
            raw = [0.8 * (top[r, j].item() - ref[r, j].item()) for j in range(n)]
            a = [min(max(x, 1e-8), 1 - 1e-8) for x in raw] if clip else raw
            assert adv[r, :n].tolist() == pytest.approx(a, abs=1e-15)
            assert adv[r, n:].tolist() == [0.0] * (KA - n)  # padding: no advantage at all, clipped or not
            q = ref_softmax(s[r].tolist())
            assert out[r].item() == pytest.approx(-math.fsum(q[i] * x for i, x in zip(kept_ids[r], a)), abs=1e-12)
            # d/d logit_v of -sum_j q_j a_j = -q_v a_v + q_v sum_j q_j a_j (a_v = 0 off the kept ids)
            mean = math.fsum(q[i] * x for i, x in zip(kept_ids[r], a))
            for v in range(VA):
                a_v = math.fsum(x for i, x in zip(kept_ids[r], a) if i == v)
                assert grad[r, v].item() == pytest.approx(-q[v] * a_v + q[v] * mean, abs=1e-12)
        # unclipped, the padding's log-probs (-500 against any reference) would be a huge negative advantage
        assert (0.8 * (top - ref))[~kept].min() < -300


@pytest.mark.parametrize("chunk_size", [3, 4, 7])
def test_chunked_token_terms_on_each_terms_own_rows(chunk_size):
    """One pass, each term on its own rows (contiguous, scattered and absent within chunks): values on those rows
    and gradients equal the unchunked functions on those rows alone; 0 and no gradient elsewhere."""
    _, ids, tlp = make_teacher()
    adv = L.adpa_advantage(tlp, rand(R, K, seed=70), clip=False)
    tgt = ids[:, 1]
    kd_rows = torch.tensor([True, True, True, False, False, True, False])
    adpa_rows = torch.tensor([False, False, False, True, True, False, True])

    def leaves():
        return rand(R, H, seed=71).requires_grad_(True), rand(V, H, seed=72).requires_grad_(True)

    h1, w1 = leaves()
    logits = h1 @ w1.T
    ref = {"logp": L.token_logprobs(logits, tgt),
           "kd": L.kd_tail_kl(logits[kd_rows], ids[kd_rows], tlp[kd_rows]),
           "adpa": L.adpa_token_loss(logits[adpa_rows], ids[adpa_rows], adv[adpa_rows])}
    coef = rand(3, R, seed=73)
    (coef[0] * ref["logp"]).sum().add((coef[1][kd_rows] * ref["kd"]).sum()).add(
        (coef[2][adpa_rows] * ref["adpa"]).sum()).backward()

    h2, w2 = leaves()
    # signals on every row; rows a term does not compute hold values it would reject (ids out of range)
    bad_ids = torch.where(kd_rows[:, None] | adpa_rows[:, None], ids, torch.full_like(ids, 10 ** 6))
    out = L.chunked_token_terms(h2, lambda h: h @ w2.T, ["logp", "kd", "adpa"],
                                {L.TARGET_IDS: tgt, L.TOPK_IDS: bad_ids, L.KD_TEACHER: L.teacher_kd_bins(tlp),
                                 L.ADVANTAGE: adv}, chunk_size=chunk_size, rows={"kd": kd_rows, "adpa": adpa_rows})
    torch.testing.assert_close(out["logp"], ref["logp"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out["kd"][kd_rows], ref["kd"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out["adpa"][adpa_rows], ref["adpa"], rtol=1e-13, atol=1e-13)
    assert (out["kd"][~kd_rows] == 0).all() and (out["adpa"][~adpa_rows] == 0).all()
    (coef[0] * out["logp"]).sum().add((coef[1] * out["kd"]).sum()).add((coef[2] * out["adpa"]).sum()).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------
# across tokenizers: ULD and the chunk likelihood
# --------------------------------------------------------------------------


def ref_uld(student_row, teacher_probs_row):
    """ULD literally: the student's full softmax sorted, the teacher's kept probabilities, the L1 over the first."""
    q = sorted(ref_softmax(student_row), reverse=True)
    return sum(abs(p - qk) for p, qk in zip(teacher_probs_row, q) if p > 0)


def test_uld_loss_matches_literal_at_ordinary_and_extreme_rows():
    logits = rand(R, V, seed=90, scale=3)
    logits[0] = rand(V, seed=91, scale=1e4)  # saturated: the student certain of one id
    logits[1] = rand(V, seed=92, scale=1e-6)  # flat
    teacher = torch.softmax(rand(R, V, seed=93, scale=2), -1).sort(-1, descending=True).values[:, :K]
    teacher[2] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # a one-hot teacher: one kept entry
    teacher[3, 1:] = 0.0  # an adaptive K's padding: only the first entry counts
    teacher[4] = 0.0  # no teacher row: nothing
    got = L.uld_loss(logits, teacher)
    for r in range(R):
        assert got[r].item() == pytest.approx(ref_uld(logits[r].tolist(), teacher[r].tolist()), rel=1e-10, abs=1e-12)
    assert got[4].item() == 0.0
    # the same sorted distribution on other ids: ULD needs no shared vocabulary, it is 0
    student = torch.log(torch.tensor([[0.1, 0.6, 0.3] + [0.0] * (V - 3)], dtype=torch.float64).clamp(min=1e-300))
    assert L.uld_loss(student, torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)).item() == pytest.approx(0, abs=1e-12)
    x = logits.clone().requires_grad_(True)
    L.uld_loss(x, teacher).sum().backward()
    assert torch.isfinite(x.grad).all()


def ref_bernoulli_kl(student_logp, teacher_logp):
    p, q = math.exp(teacher_logp), math.exp(student_logp)
    out = p * math.log(p / q) if p > 0 else 0.0
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def test_chunk_likelihood_loss_is_the_kl_of_the_chunks_bernoullis():
    student = torch.tensor([-0.1, -2.0, -30.0, -0.5, -1e-3, -5.0], dtype=torch.float64)
    teacher = torch.tensor([-0.7, -2.0, -1.0, -40.0, -2.0, -1e-4], dtype=torch.float64)
    got = L.chunk_likelihood_loss(student, teacher)
    for c in range(student.shape[0]):
        assert got[c].item() == pytest.approx(ref_bernoulli_kl(student[c].item(), teacher[c].item()), rel=1e-9,
                                              abs=1e-12)
    assert got[1].item() == 0.0 and (got >= 0).all()
    # a certain chunk (log-prob 0) on either side stays finite, its log(1 - p) clamped at the smallest normal
    edge = L.chunk_likelihood_loss(torch.tensor([0.0, -3.0], requires_grad=True), torch.tensor([-3.0, 0.0]))
    assert torch.isfinite(edge).all()
    x = student.clone().requires_grad_(True)
    L.chunk_likelihood_loss(x, teacher).sum().backward()
    # d/dl_S of the Bernoulli KL: -p_T + (1 - p_T) q_S / (1 - q_S)
    for c in range(student.shape[0]):
        p, q = math.exp(teacher[c].item()), math.exp(student[c].item())
        assert x.grad[c].item() == pytest.approx(-p + (1 - p) * q / (1 - q), rel=1e-8, abs=1e-12)
