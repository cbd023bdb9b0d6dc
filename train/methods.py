"""Training methods as sums of loss terms.

A *term* is one weighted piece of a training loss: a name, a default weight,
the store signals it reads (``{set: [sections]}``), the per-token quantities it
needs from the student's forward pass, and a pure function
``(batch, outputs, settings) -> scalar``. A *method* is a list of terms, and a
combination such as ``dckd+adpa`` is the union of its methods' terms; the
loss is always ``sum_term weight * term``. Nothing in the trainer branches on a
method's name.

Combining: a term that two methods share (SFT on the chosen response is in both
``dckd`` and ``adpa``) counts ONCE, so ``dckd+adpa`` is
``1*sft + 0.1*kd_chosen + 0.1*kd_rejected + 1.6*adpa``, not ``2*sft + ...``.
Reason: each paper's objective has one SFT anchor; doubling it would silently
halve the other terms' relative weight. Where two methods give a shared term
different default weights (``kd`` uses ``kd_chosen`` at 1, ``dckd`` at 0.1),
the method written first wins; ``--weight NAME=VALUE`` overrides any of them,
and a weight of 0 drops the term (and what it alone needs from the store).

Defaults are the released values (``shared/design/METHODS.md``): DCKD
``w_sft = 1, w_kd_chosen = w_kd_rejected = 0.1``; ADPA ``w_sft = 1,
w_adpa = 1.6`` with the released code's clipped advantage; SimPO beta 2.0,
gamma 0.5. DPO: beta 0.1 (the DPO paper's and TRL's default). METHODS.md's
"released beta 0.01" is the beta the *teacher* was aligned with, not a value
measured for a distilled student; ``--dpo-beta 0.01`` reproduces it.

Token means: every token-level term is the mean over all of its tokens in the
micro-batch (not a mean of per-sequence means), as TRL's SFT and the ADPA
code do; sequence-level terms (DPO, SimPO) are the mean over pairs.

The student forward (:func:`student_outputs`) runs the decoder once over the
sequences some term needs, then the output layer only on the response rows
that some term asked for, in row chunks (:func:`train.losses.chunked_token_terms`),
so a [tokens, vocabulary] log-softmax never exists whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from store import format as fmt

from . import losses
from .batches import Batch

PAIRS, GENERATED = fmt.SET_PAIRS, fmt.SET_GENERATED
TEACHER, REFERENCE, STUDENT_INIT = fmt.SECTION_TEACHER, fmt.SECTION_REFERENCE, fmt.SECTION_STUDENT_INIT
CHOSEN, REJECTED, GENERATED_ROLE = fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED, fmt.ROLE_GENERATED

#: per-token quantities the student forward can produce
LOGP, KD, ADPA = "logp", "kd", "adpa"
QUANTITIES = (LOGP, KD, ADPA)


@dataclass(frozen=True)
class Settings:
    """Loss hyper-parameters other than term weights (defaults: see module docstring)."""

    dpo_beta: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    adpa_beta: float = 1.0  # A = beta * (log pi_T - log pi_R)
    adpa_clip: bool = True  # released code: A clipped into [1e-8, 1 - 1e-8]


@dataclass(frozen=True)
class TokenRequest:
    """A per-token quantity (``logp``, ``kd`` or ``adpa``) on the response rows of one role of one set."""

    quantity: str
    sequence_set: str
    role: int


@dataclass
class StudentOutputs:
    """What the student's forward produced, one value per response row of the batch ([R], float32).

    ``logp[r]``: log pi_theta of the row's target token; ``kd[r]``: tail-bucket KL to the
    teacher; ``adpa[r]``: ADPA's token loss. Rows nobody asked for hold 0 and are false in
    ``computed[quantity]``.
    """

    logp: torch.Tensor
    kd: torch.Tensor
    adpa: torch.Tensor
    computed: dict[str, torch.Tensor]


LossFn = Callable[[Batch, StudentOutputs, Settings], torch.Tensor]


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    needs: Mapping[str, tuple[str, ...]]  # store signals: set -> sections (base arrays always)
    tokens: tuple[TokenRequest, ...]  # per-token quantities the forward must produce
    loss: LossFn


# --------------------------------------------------------------------------- helpers


def response_rows(batch: Batch, sequence_set: str, role: int) -> torch.Tensor:
    """[R] bool: response rows of the sequences of ``sequence_set`` with ``role``."""
    return batch.sequences_where(sequence_set, role)[batch.resp_seq]


def token_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[rows]`` ([R] values, [R] bool rows); 0 when no row is selected."""
    return values[rows].sum() / rows.sum().clamp(min=1)


def pair_sequences(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [P] of the chosen and of the rejected sequence of each pair, matched by example."""
    chosen = batch.sequences_where(PAIRS, CHOSEN).nonzero().squeeze(1)
    rejected = batch.sequences_where(PAIRS, REJECTED).nonzero().squeeze(1)
    chosen = chosen[torch.argsort(batch.seq_example[chosen], stable=True)]
    rejected = rejected[torch.argsort(batch.seq_example[rejected], stable=True)]
    if chosen.shape != rejected.shape or not torch.equal(batch.seq_example[chosen], batch.seq_example[rejected]):
        raise ValueError("batch has examples without both a chosen and a rejected response")
    return chosen, rejected


def pair_logp_sums(batch: Batch, out: StudentOutputs) -> torch.Tensor:
    """[B] the student's summed response log-prob of each sequence (0 where not computed)."""
    return losses.sequence_sums(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])


# --------------------------------------------------------------------------- the terms


def sft_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SFT(y_w) = - mean_t log pi_theta(y_w,t | s_t) over every chosen-response token of the batch.

    Source: METHODS.md section 2 (the anchor term of DCKD and ADPA, "Advantage-Guided
    Distillation for Preference Alignment in Small Language Models").
    """
    return token_mean(-out.logp, response_rows(batch, PAIRS, CHOSEN))


def kd_chosen_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """KD(y_w): mean over chosen-response tokens of KL(p_T || q_theta) over the teacher's top-K + a tail bin.

    Source: ADPA repository ``get_kl_loss`` with TRL's tail bucket; DCKD's first KL
    constraint (METHODS.md section 2). Per token: :func:`train.losses.kd_tail_kl`.
    """
    return token_mean(out.kd, response_rows(batch, PAIRS, CHOSEN))


def kd_rejected_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """KD(y_l): the same tail-bucket KL on the rejected response's tokens (DCKD's second constraint)."""
    return token_mean(out.kd, response_rows(batch, PAIRS, REJECTED))


def adpa_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """L_ADPA = - mean_t sum_k pi_theta(topk_ids[t,k] | s_t) A[t,k] over the student's generated answers.

    ``A = adpa_beta * (teacher/topk_logp - reference/topk_logp)``, clipped into
    [1e-8, 1 - 1e-8] unless ``adpa_clip`` is false (ADPA paper, equation of L_ADPA;
    clip from the released code, METHODS.md section 2). The advantage is built in
    :func:`student_outputs`; per token: :func:`train.losses.adpa_token_loss`.
    """
    return token_mean(out.adpa, response_rows(batch, GENERATED, GENERATED_ROLE))


def dpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """DPO, mean over pairs of -log sigmoid(beta * ((pc - rc) - (pr - rr))).

    ``pc, pr``: the student's summed log-probs of chosen and rejected; ``rc, rr``: the
    initial model's, from ``pairs/student_init/logp_sum``. Rafailov et al. 2023,
    :func:`train.losses.dpo_loss`.
    """
    chosen, rejected = pair_sequences(batch)
    sums = pair_logp_sums(batch, out)
    ref = batch.scalars[f"{STUDENT_INIT}/logp_sum"]
    return losses.dpo_loss(sums[chosen], sums[rejected], ref[chosen], ref[rejected], settings.dpo_beta).mean()


def simpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SimPO, mean over pairs of -log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma).

    Meng et al. 2024; length-normalised log-probs, no reference; :func:`train.losses.simpo_loss`.
    """
    chosen, rejected = pair_sequences(batch)
    means = losses.sequence_means(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])
    return losses.simpo_loss(means[chosen], means[rejected], settings.simpo_beta, settings.simpo_gamma).mean()


SFT = Term("sft", 1.0, {PAIRS: ()}, (TokenRequest(LOGP, PAIRS, CHOSEN),), sft_term)
KD_CHOSEN = Term("kd_chosen", 0.1, {PAIRS: (TEACHER,)}, (TokenRequest(KD, PAIRS, CHOSEN),), kd_chosen_term)
KD_REJECTED = Term("kd_rejected", 0.1, {PAIRS: (TEACHER,)}, (TokenRequest(KD, PAIRS, REJECTED),),
                   kd_rejected_term)
ADPA_TERM = Term("adpa", 1.6, {GENERATED: (TEACHER, REFERENCE)},
                 (TokenRequest(ADPA, GENERATED, GENERATED_ROLE),), adpa_term)
DPO = Term("dpo", 1.0, {PAIRS: (STUDENT_INIT,)},
           (TokenRequest(LOGP, PAIRS, CHOSEN), TokenRequest(LOGP, PAIRS, REJECTED)), dpo_term)
SIMPO = Term("simpo", 1.0, {PAIRS: ()},
             (TokenRequest(LOGP, PAIRS, CHOSEN), TokenRequest(LOGP, PAIRS, REJECTED)), simpo_term)

METHODS: dict[str, tuple[Term, ...]] = {
    "sft": (SFT,),
    "kd": (dataclasses.replace(KD_CHOSEN, weight=1.0),),
    "dckd": (SFT, KD_CHOSEN, KD_REJECTED),
    "dpo": (DPO,),
    "simpo": (SIMPO,),
    "adpa": (SFT, ADPA_TERM),
}

#: which ``precompute teacher --passes`` value writes each store signal
PASS_OF = {
    f"{PAIRS}/{fmt.BASE}": "pairs", f"{PAIRS}/{TEACHER}": "pairs", f"{PAIRS}/{STUDENT_INIT}": "dpo_ref",
    f"{GENERATED}/{fmt.BASE}": "adpa", f"{GENERATED}/{TEACHER}": "adpa", f"{GENERATED}/{REFERENCE}": "adpa",
}


# --------------------------------------------------------------------------- combining


def resolve_terms(method: str, weights: Mapping[str, float] | None = None) -> list[Term]:
    """The terms of ``method`` (``"dckd+adpa"``), shared terms once, weights overridden by ``weights``.

    Raises ValueError for an unknown method or a weight for a term the method lacks.
    """
    names = [m.strip() for m in method.split("+") if m.strip()]
    if not names:
        raise ValueError("empty --method")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}; known: {', '.join(METHODS)} (combine with +)")
    terms: dict[str, Term] = {}
    for name in names:
        for term in METHODS[name]:
            terms.setdefault(term.name, term)  # shared term: once, first method's weight
    for name, weight in (weights or {}).items():
        if name not in terms:
            raise ValueError(f"--weight {name}: method {method} has no term {name!r}; "
                             f"its terms: {', '.join(terms)}")
        terms[name] = dataclasses.replace(terms[name], weight=float(weight))
    kept = [t for t in terms.values() if t.weight != 0]
    if not kept:
        raise ValueError(f"method {method}: every term has weight 0")
    return kept


def needs_of(terms: list[Term]) -> dict[str, list[str]]:
    """Union of the terms' store needs: ``{set: [sections]}`` in format order."""
    wanted: dict[str, set[str]] = {}
    for term in terms:
        for sequence_set, sections in term.needs.items():
            wanted.setdefault(sequence_set, set()).update(sections)
    return {s: [sec for sec in fmt.SECTIONS if sec in wanted[s]] for s in fmt.SEQUENCE_SETS if s in wanted}


def token_requests(terms: list[Term]) -> tuple[TokenRequest, ...]:
    return tuple(dict.fromkeys(r for t in terms for r in t.tokens))


# --------------------------------------------------------------------------- the student forward


def check_output_layer(model) -> None:
    """Refuse models whose logits are not ``hidden @ W.T (+ b)`` (soft-capping, logit scale)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    if cap or (isinstance(scale, (int, float)) and scale != 1):
        raise ValueError(f"{type(model).__name__}: logit soft-capping / scaling is not supported by the "
                         "chunked output layer")
    if getattr(model, model.base_model_prefix, None) is None or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__}: cannot split into decoder and output layer")


def student_outputs(model, batch: Batch, requests: tuple[TokenRequest, ...], settings: Settings,
                    chunk_size: int = 1024) -> StudentOutputs:
    """Run the student on ``batch`` and compute the requested per-token quantities.

    1. rows: the union of the requests' response rows per quantity (``kd`` and
       ``adpa`` rows get ``logp`` too, for free);
    2. the decoder (``getattr(model, model.base_model_prefix)``) runs only over the
       sequences that own such rows, trimmed to their longest length;
    3. hidden states at ``resp_pos`` of those rows go through the output layer in
       chunks (:func:`train.losses.chunked_token_terms`), once per group of rows
       that needs the same quantities, with the teacher's top-K (``kd``) and the
       ADPA advantage ``adpa_advantage(teacher/topk_logp, reference/topk_logp)``
       (``adpa``).

    Shapes: every output is [R] (R = batch.num_response_tokens), float32 (float64 for a
    float64 model).
    """
    R = batch.num_response_tokens
    device = batch.input_ids.device
    want = {q: torch.zeros(R, dtype=torch.bool, device=device) for q in QUANTITIES}
    for request in requests:
        want[request.quantity] |= response_rows(batch, request.sequence_set, request.role)
    want[LOGP] |= want[KD] | want[ADPA]
    if not bool(want[LOGP].any()):
        zeros = torch.zeros(R, dtype=torch.float32, device=device)
        return StudentOutputs(**{q: zeros for q in QUANTITIES}, computed=want)

    run = torch.zeros(batch.num_sequences, dtype=torch.bool, device=device)
    run[batch.resp_seq[want[LOGP]]] = True
    run_index = run.nonzero().squeeze(1)
    position_in_run = torch.cumsum(run.long(), 0) - 1  # sequence -> its row in the decoder batch
    length = int(batch.attention_mask[run_index].sum(1).max())
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=batch.input_ids[run_index, :length],
                     attention_mask=batch.attention_mask[run_index, :length]).last_hidden_state
    head = model.get_output_embeddings()
    zeros = torch.zeros(R, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32, device=device)
    values = {q: zeros for q in QUANTITIES}

    for with_kd in (False, True):
        for with_adpa in (False, True):
            rows = want[LOGP] & (want[KD] == with_kd) & (want[ADPA] == with_adpa)
            if not bool(rows.any()):
                continue
            index = rows.nonzero().squeeze(1)
            picked = hidden[position_in_run[batch.resp_seq[index]], batch.resp_pos[index]]
            topk_ids = topk_logp = advantage = None
            if with_kd or with_adpa:
                topk_ids = _signal(batch, f"{TEACHER}/topk_ids", index)
            if with_kd:
                topk_logp = _signal(batch, f"{TEACHER}/topk_logp", index)
            if with_adpa:
                advantage = losses.adpa_advantage(_signal(batch, f"{TEACHER}/topk_logp", index),
                                                  _signal(batch, f"{REFERENCE}/topk_logp", index),
                                                  beta=settings.adpa_beta, clip=settings.adpa_clip)
            got = losses.chunked_token_terms(picked, head.weight, batch.resp_target[index], topk_ids=topk_ids,
                                             topk_logp=topk_logp, advantage=advantage, chunk_size=chunk_size,
                                             lm_head_bias=getattr(head, "bias", None))
            for quantity, value in got.items():
                values[quantity] = values[quantity].index_put((index,), value.to(zeros.dtype))
    return StudentOutputs(**values, computed=want)


def _signal(batch: Batch, name: str, index: torch.Tensor) -> torch.Tensor:
    if name not in batch.response or not bool(batch.has[name][index].all()):
        raise ValueError(f"batch lacks store signal {name} on rows a term needs")
    return batch.response[name][index]


def method_loss(model, batch: Batch, terms: list[Term], settings: Settings,
                chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_t weight_t * term_t, {term name: unweighted value})`` of ``terms`` on ``batch``."""
    outputs = student_outputs(model, batch, token_requests(terms), settings, chunk_size)
    parts = {term.name: term.loss(batch, outputs, settings) for term in terms}
    total = sum(term.weight * parts[term.name] for term in terms)
    return total, parts
