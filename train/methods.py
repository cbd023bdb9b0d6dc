"""Training methods as sums of loss terms.

A *term* is one weighted piece of a training loss: a name, a default weight,
the store signals it reads (``{set: [sections]}``), the per-token quantities it
needs from the student's forward pass, a pure function
``(batch, outputs, settings) -> scalar``, and the :class:`Unit` that function is a
mean over (response tokens, pairs, groups: what lets several processes make the
one-process mean). A *method* is a list of terms, and a combination such as
``dckd+adpa`` is the union of its methods' terms; the loss is always
``sum_term weight * term``. Nothing in the trainer branches on a method's name.

A new per-token loss: its function of the student's log-softmax rows and its entry
in :data:`train.losses.TOKEN_TERMS` (autograd differentiates it), then a term of it
(:func:`token_mean_term`) and its method in :data:`METHODS` (a worked example:
``docs/development.md``, "Adding a per-token loss").

Combining: a term that two methods share (SFT on the chosen response is in both
``dckd`` and ``adpa``) counts ONCE, so ``dckd+adpa`` is
``1*sft + 1*kd_chosen + 1*kd_rejected + 1.6*adpa``, not ``2*sft + ...``.
Reason: each paper's objective has one SFT anchor; doubling it would silently
halve the other terms' relative weight. Where two methods give a shared term
different default weights, the method written first wins; ``--weight NAME=VALUE`` overrides any of them,
and a weight of 0 drops the term (and what it alone needs from the store).
Methods that read different sequence sets (``pad+sft``: the groups and the
pairs) train on the examples that have every set the combination reads.

Defaults are the released values (``docs/methods.md``) except DCKD's KD weights:
``w_sft = 1, w_kd_chosen = w_kd_rejected = 1`` where the released recipe has 0.1
(``--weight kd_chosen=0.1 --weight kd_rejected=0.1`` reproduces it). The SFT term on the
dataset's labels, which are noisy relative to the teacher, dilutes the teacher's
signal at KD 0.1 (the measurement: ``docs/efficacy.md``, "Defaults this changed").
ADPA ``w_sft = 1, w_adpa = 1.6`` with the released code's clipped advantage ("Advantage-Guided
Distillation for Preference Alignment in Small Language Models"); SimPO beta
2.0, gamma 0.5 (Meng et al. 2024, "SimPO"). DPO: beta 0.1 (the DPO paper's,
Rafailov et al. 2023, and TRL's default). The "released beta 0.01" is the beta
the *teacher* was aligned with, not a value measured for a distilled student;
``--dpo-beta 0.01`` reproduces it. Every default other than a weight is
declared once, in :class:`Settings`, which is also where the command-line
options ``--dpo-beta`` ... ``--pad-max-group`` come from.

Token means: every token-level term is the mean over all of its tokens in the
micro-batch (not a mean of per-sequence means), as TRL's SFT and the ADPA
code do; sequence-level terms (DPO, SimPO) are the mean over pairs.

Group-level terms (PAD and the baselines built from the same groups) read the
``samples`` set: a batch holds whole examples, so every response of a group is in
the batch that holds the group (:func:`sample_groups` gathers them into [G, n]).
Rewards, PAD (Gu et al., "Preference-Aligned Distillation"; ``docs/methods.md``):

- student ``r_S(i) = beta * avglogp_theta(y_i)``, live and differentiable;
- teacher ``r_T(i) = beta * (alpha * avglogp_T(y_i) + (1 - alpha) * s_mcq(i))`` with
  ``avglogp_T = samples/teacher/logp_sum / response length`` and ``s_mcq`` =
  ``samples/teacher_mcq/mcq_score``. alpha and beta are chosen at training time,
  so one store serves every alpha; a part of weight 0 is neither read nor needed
  (:func:`pad_reward_sections`): alpha 1 trains on a store without the calibration
  (``precompute teacher --passes pad_logp``), alpha 0 on one without the sums (``pad_mcq``).

Defaults: beta 10 (released). alpha 0.5, not the released 0 (pure calibration):
the embedded teacher's pairwise judgements carry almost no signal, so at alpha = 0
its distribution over orderings is noise to distil, while alpha = 0.5 keeps the
calibration term for a teacher whose judgements do (the measurement: ``docs/pad.md``,
"Why alpha defaults to 0.5"). ``--pad-alpha 0`` reproduces the release.

``pad``: PPD (Jensen-Shannon divergence between the student's and the teacher's
Plackett-Luce distributions over orderings) or VPD (``-log P_S(teacher's order)``),
``--pad-loss``; groups larger than ``pad_max_group`` (6: 720 orderings) are
decomposed as :func:`train.losses.pad_loss` documents. Baselines on the same
groups, the teacher's best response (highest r_T) as chosen and its worst as
rejected: ``pad_dpo`` (DPO, reference sums from ``samples/student_init``) and
``pad_simpo`` (SimPO, no reference), with the DPO / SimPO settings.

The student forward (:func:`student_outputs`) splits the model into decoder and
output layer (:func:`lm.head.split_model`, the split precompute uses: logit
soft-capping and scale included), runs the decoder once over the sequences some
term needs, then the output layer only on the response rows that some term asked
for, in row chunks (:func:`train.losses.chunked_token_terms`), so a
[tokens, vocabulary] log-softmax never exists whole. The per-token quantities it
can produce are the table :data:`train.losses.TOKEN_TERMS`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping

import click
import torch

from lm import head
from lm.options import check_option_values, setting
from store import format as fmt

from . import losses
from .batches import Batch
from .losses import ADPA, CHUNK, KD, LOGP, ULD

PAIRS, GENERATED, SAMPLES = fmt.SET_PAIRS, fmt.SET_GENERATED, fmt.SET_SAMPLES
TEACHER, REFERENCE, STUDENT_INIT = fmt.SECTION_TEACHER, fmt.SECTION_REFERENCE, fmt.SECTION_STUDENT_INIT
TEACHER_MCQ = fmt.SECTION_TEACHER_MCQ
JUDGE = fmt.SECTION_JUDGE
CHOSEN, REJECTED, GENERATED_ROLE = fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED, fmt.ROLE_GENERATED


#: ``--cross-tokenizer-loss``: what KD computes on a cross-tokenizer store's rows without an exact teacher token
CROSS_TOKENIZER_LOSSES = ("uld", "chunk")

#: ``--kd-tail``: how KD counts the teacher's mass outside its top-K (:func:`kd_rows_by_tail`)
KD_TAIL_AUTO, KD_TAIL_BIN, KD_TAIL_SAMPLES = "auto", "bin", "samples"
KD_TAILS = (KD_TAIL_AUTO, KD_TAIL_BIN, KD_TAIL_SAMPLES)


@dataclass(frozen=True)
class Settings:
    """Loss hyper-parameters other than term weights (defaults: see module docstring).

    Each field is also a command-line option of ``train student`` (the PAD reward's
    two of ``train evaluate`` as well): its default and help are written here once,
    and values are checked against the option's range when the object is made.
    """

    dpo_beta: float = setting(0.1, "DPO beta (DPO paper / TRL default; the teacher was aligned with 0.01).",
                              type=float)
    simpo_beta: float = setting(2.0, "SimPO beta (the SimPO paper's most common value).", type=float)
    simpo_gamma: float = setting(0.5, "SimPO margin, in reward units.", type=float)
    adpa_beta: float = setting(1.0, "ADPA advantage scale: A = beta * (log pi_T - log pi_R).", type=float)
    adpa_unclipped: bool = setting(False, "Use the paper's unclipped advantage (default: clipped into "
                                   "[1e-8, 1-1e-8] like the released code).", is_flag=True)
    pad_loss: str = setting("ppd", "PAD: ppd (Jensen-Shannon divergence of the orderings' distributions) or vpd "
                            "(-log P of the teacher's order).", type=click.Choice(losses.PAD_LOSSES))
    pad_beta: float = setting(10.0, "PAD: reward scale, student and teacher (released 10).",
                              type=click.FloatRange(min=0, min_open=True))
    pad_alpha: float = setting(0.5, "PAD: teacher reward = alpha * mean log-prob + (1 - alpha) * calibration score; "
                               "released 0, whose calibration the embedded teacher cannot judge (see "
                               "train/methods.py).", type=click.FloatRange(0, 1))
    pad_max_group: int = setting(losses.MAX_EXACT_PL_GROUP, "PAD PPD: larger groups are split into overlapping "
                                 "windows of this size (6! = 720 orderings); VPD is exact for any size.",
                                 type=click.IntRange(2, losses.MAX_EXACT_PL_GROUP))
    pro_temperature: float = setting(1.0, "PRO: the scores (mean log-probs) are divided by this before the "
                                     "listwise loss.", type=click.FloatRange(min=0, min_open=True))
    cross_tokenizer_loss: str = setting(CROSS_TOKENIZER_LOSSES[0], "KD across tokenizers, on student tokens without "
                                        "an exactly matching teacher token: uld (Universal Logit Distillation where "
                                        "a teacher token starts together) or chunk (the likelihood of aligned "
                                        "chunks, which also covers tokens no teacher token starts at).",
                                        type=click.Choice(CROSS_TOKENIZER_LOSSES))
    kd_tail: str = setting(KD_TAIL_AUTO, "KD's tail: samples (the store's tail samples, an unbiased estimate of the "
                           "full-vocabulary KL), bin (one tail bin), or auto (samples where the store has them).",
                           type=click.Choice(KD_TAILS))

    def __post_init__(self):
        check_option_values(self)


@dataclass(frozen=True)
class TokenRequest:
    """A per-token quantity (a :data:`train.losses.TOKEN_TERMS` name) on the response rows of one role of one set.

    ``role`` None: every sequence of the set (a group's samples have roles 16 + i).
    """

    quantity: str
    sequence_set: str
    role: int | None


@dataclass
class StudentOutputs:
    """What the student's forward produced: per quantity, one value per response row of the batch ([R], float32).

    ``values[name]`` for every :data:`train.losses.TOKEN_TERMS` entry, also read as an
    attribute: ``out.logp[r]`` is log pi_theta of the row's target token, ``out.kd[r]``
    the tail-bucket KL to the teacher, ``out.adpa[r]`` ADPA's token loss. Rows nobody
    asked for hold 0 and are false in ``computed[name]``.
    """

    values: dict[str, torch.Tensor]
    computed: dict[str, torch.Tensor]

    def __getattr__(self, name: str) -> torch.Tensor:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no quantity {name!r}")


LossFn = Callable[[Batch, StudentOutputs, Settings], torch.Tensor]


@dataclass(frozen=True)
class Unit:
    """What a term is a mean over (``what``: response tokens, pairs, groups) and ``count(batch)``, how many of
    them a batch holds: the term's denominator.

    On several processes (:mod:`train.distributed`) each process's value of a term is weighted by its
    share of the term's units in the step, which makes the mean over the union of their batches exactly.
    A term's unit must be what its loss divides by (tests/test_train_distributed.py checks every term).
    """

    what: str
    count: Callable[[Batch], int]


@dataclass(frozen=True)
class Term:
    """One weighted piece of a method's loss (module docstring)."""

    name: str
    weight: float
    needs: Mapping[str, tuple[str, ...]]  # store signals: set -> sections (base arrays always)
    tokens: tuple[TokenRequest, ...]  # per-token quantities the forward must produce
    loss: LossFn
    unit: Unit  # what ``loss`` is a mean over
    # where what the term reads depends on its settings (PAD's alpha): those needs, a subset of ``needs``
    settings_needs: Callable[[Settings], Mapping[str, tuple[str, ...]]] | None = None

    def needs_with(self, settings: Settings | None) -> Mapping[str, tuple[str, ...]]:
        """The store signals the term reads with ``settings`` (None: every signal it may read, ``needs``)."""
        return self.needs if settings is None or self.settings_needs is None else self.settings_needs(settings)


# --------------------------------------------------------------------------- helpers


def response_rows(batch: Batch, sequence_set: str, role: int | None) -> torch.Tensor:
    """[R] bool: response rows of the sequences of ``sequence_set`` with ``role`` (None: any role)."""
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


def sample_groups(batch: Batch) -> list[torch.Tensor]:
    """The batch's groups of sampled responses as sequence indices, one [G, n] tensor per group size n.

    Row g lists the sequences of one example's group in group position order
    (sample i, role 16 + i, in column i); groups come in example order. A store's
    groups all have ``keep`` responses, so there is one tensor; mixed sizes give one
    per size, in increasing n.
    """
    seq = batch.sequences_where(SAMPLES).nonzero().squeeze(1)
    if seq.numel() == 0:
        return []
    width = int(batch.seq_group_pos[seq].max()) + 1
    seq = seq[torch.argsort(batch.seq_example[seq] * width + batch.seq_group_pos[seq])]
    _, sizes = torch.unique_consecutive(batch.seq_example[seq], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    groups = []
    for n in sorted(set(sizes.tolist())):
        index = seq[starts[sizes == n][:, None] + torch.arange(n, device=seq.device)]
        if not torch.equal(batch.seq_group_pos[index], torch.arange(n, device=seq.device).expand_as(index)):
            raise ValueError("batch has a group whose sample positions are not 0..n-1")
        groups.append(index)
    return groups


def sequence_lengths(batch: Batch) -> torch.Tensor:
    """[B] response tokens of each sequence (the store's response_length)."""
    return torch.bincount(batch.resp_seq, minlength=batch.num_sequences)


def teacher_lengths(batch: Batch, index: torch.Tensor) -> torch.Tensor:
    """The number of response tokens the teacher's ``logp_sum`` of the sequences ``index`` runs over: the teacher's
    own (``teacher/teacher_length``) where the store aligned across tokenizers, else the response length."""
    lengths = sequence_lengths(batch)[index]
    name = fmt.signal_name(TEACHER, fmt.ARRAY_TEACHER_LENGTH)
    if name not in batch.scalars:
        return lengths
    return torch.where(batch.has[name][index], batch.scalars[name][index].round().long(), lengths)


def teacher_rewards(batch: Batch, index: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[G, n] PAD's teacher reward of the sequences ``index`` [G, n] (module docstring), float64.

    ``beta * (alpha * teacher/logp_sum / length + (1 - alpha) * teacher_mcq/mcq_score)``, length the teacher's
    response tokens (:func:`teacher_lengths`); a part whose weight is 0 is not read.
    """
    mean_logp = mcq = torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    if settings.pad_alpha != 0:
        logp_sum = _scalar(batch, fmt.signal_name(TEACHER, fmt.ARRAY_LOGP_SUM), index).double()
        mean_logp = logp_sum / teacher_lengths(batch, index).clamp(min=1).double()
    if settings.pad_alpha != 1:
        mcq = _scalar(batch, fmt.signal_name(TEACHER_MCQ, fmt.ARRAY_MCQ_SCORE), index).double()
    return losses.pad_teacher_rewards(mean_logp, mcq, settings.pad_alpha, settings.pad_beta)


def student_rewards(batch: Batch, out: StudentOutputs, index: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[G, n] PAD's student reward ``beta * avglogp_theta`` of the sequences ``index`` [G, n], differentiable."""
    means = losses.sequence_means(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])
    return settings.pad_beta * means[index]


def best_and_worst(batch: Batch, index: torch.Tensor, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """[G] sequences with the highest and the lowest teacher reward of each group (ties: lowest position)."""
    rewards = teacher_rewards(batch, index, settings)
    best = index.gather(1, rewards.argmax(1, keepdim=True)).squeeze(1)
    worst = index.gather(1, (-rewards).argmax(1, keepdim=True)).squeeze(1)
    return best, worst


def _scalar(batch: Batch, name: str, index: torch.Tensor) -> torch.Tensor:
    if name not in batch.scalars or not bool(batch.has[name][index].all()):
        raise ValueError(f"batch lacks store signal {name} on sequences a term needs")
    return batch.scalars[name][index]


def _group_mean(values: list[torch.Tensor], out: StudentOutputs) -> torch.Tensor:
    """Mean over every group of the batch of per-group values ([G] each); 0 without a group."""
    if not values:
        return out.logp.new_zeros(())
    return torch.cat(values).mean()


def agreed_ranks(batch: Batch, index: torch.Tensor) -> torch.Tensor:
    """[G, n] each response's place in its group's agreed ranking (``samples/judge/agreed_rank``), -1 outside it."""
    return _scalar(batch, fmt.signal_name(JUDGE, fmt.ARRAY_AGREED_RANK), index).round().long()


def labelled_groups(batch: Batch):
    """(sequence indices [G, n], agreed ranks [G, n]) of the groups with a pseudo-label (two or more agreed
    responses), per group size (possibly empty): the groups CycleAlign's terms are means over."""
    for index in sample_groups(batch):
        ranks = agreed_ranks(batch, index)
        labelled = (ranks >= 0).sum(-1) >= 2
        yield index[labelled], ranks[labelled]


def best_rows(batch: Batch) -> torch.Tensor:
    """[R] bool: the response rows of the top response of each group with a pseudo-label (``sft_best``'s tokens)."""
    best = torch.zeros(batch.num_sequences, dtype=torch.bool, device=batch.resp_seq.device)
    for index, ranks in labelled_groups(batch):
        best[index[ranks == 0]] = True
    return best[batch.resp_seq]


# --------------------------------------------------------------------------- what the terms are means over


def over_tokens(sequence_set: str, role: int | None) -> Unit:
    """The response tokens of the sequences of ``sequence_set`` with ``role`` (None: any role)."""
    return Unit(f"response tokens of {sequence_set} role {role}",
                lambda batch: int(response_rows(batch, sequence_set, role).sum()))


OVER_PAIRS = Unit("chosen/rejected pairs", lambda batch: int(batch.sequences_where(PAIRS, CHOSEN).sum()))
OVER_GROUPS = Unit("groups of samples", lambda batch: sum(int(index.shape[0]) for index in sample_groups(batch)))
OVER_LABELLED_GROUPS = Unit("groups with a pseudo-label",
                            lambda batch: sum(int(index.shape[0]) for index, _ in labelled_groups(batch)))
OVER_BEST_TOKENS = Unit("response tokens of each labelled group's top response",
                        lambda batch: int(best_rows(batch).sum()))


# --------------------------------------------------------------------------- the terms


def sft_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SFT(y_w) = - mean_t log pi_theta(y_w,t | s_t) over every chosen-response token of the batch.

    Source: the anchor term of DCKD and ADPA ("Advantage-Guided Distillation for
    Preference Alignment in Small Language Models"; ``docs/methods.md``).
    """
    return token_mean(-out.logp, response_rows(batch, PAIRS, CHOSEN))


def dpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """DPO, mean over pairs of -log sigmoid(beta * ((pc - rc) - (pr - rr))).

    ``pc, pr``: the student's summed log-probs of chosen and rejected; ``rc, rr``: the
    initial model's, from ``pairs/student_init/logp_sum``. Rafailov et al. 2023,
    :func:`train.losses.dpo_loss`.
    """
    chosen, rejected = pair_sequences(batch)
    sums = pair_logp_sums(batch, out)
    ref = batch.scalars[fmt.signal_name(STUDENT_INIT, fmt.ARRAY_LOGP_SUM)]
    return losses.dpo_loss(sums[chosen], sums[rejected], ref[chosen], ref[rejected], settings.dpo_beta).mean()


def simpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SimPO, mean over pairs of -log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma).

    Meng et al. 2024; length-normalised log-probs, no reference; :func:`train.losses.simpo_loss`.
    """
    chosen, rejected = pair_sequences(batch)
    means = losses.sequence_means(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])
    return losses.simpo_loss(means[chosen], means[rejected], settings.simpo_beta, settings.simpo_gamma).mean()


def pad_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """PAD, mean over groups of PPD (JSD of the Plackett-Luce distributions over orderings) or VPD.

    ``r_S = beta * avglogp_theta``, ``r_T`` from the store (:func:`teacher_rewards`);
    :func:`train.losses.pad_loss` with ``settings.pad_loss`` and ``pad_max_group``
    (exact over all n! orderings up to 6, decomposed above). Gu et al.,
    "Preference-Aligned Distillation" (code EganGu/PAD); ``docs/methods.md``.
    """
    values = [losses.pad_loss(student_rewards(batch, out, index, settings), teacher_rewards(batch, index, settings),
                              kind=settings.pad_loss, max_group=settings.pad_max_group)
              for index in sample_groups(batch)]
    return _group_mean(values, out)


def pad_dpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """DPO on each group's teacher-best (chosen) and teacher-worst (rejected) response, mean over groups.

    PAD's DPO baseline built from the same groups: :func:`dpo_term`'s loss with the
    initial model's sums from ``samples/student_init/logp_sum`` and ``dpo_beta``.
    """
    sums = pair_logp_sums(batch, out)
    values = []
    for index in sample_groups(batch):
        best, worst = best_and_worst(batch, index, settings)
        ref_best = _scalar(batch, fmt.signal_name(STUDENT_INIT, fmt.ARRAY_LOGP_SUM), best)
        ref_worst = _scalar(batch, fmt.signal_name(STUDENT_INIT, fmt.ARRAY_LOGP_SUM), worst)
        values.append(losses.dpo_loss(sums[best], sums[worst], ref_best, ref_worst, settings.dpo_beta))
    return _group_mean(values, out)


def pad_simpo_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SimPO on each group's teacher-best and teacher-worst response, mean over groups (no reference).

    PAD's SimPO baseline built from the same groups: :func:`simpo_term`'s loss with
    ``simpo_beta`` and ``simpo_gamma``.
    """
    means = losses.sequence_means(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])
    values = []
    for index in sample_groups(batch):
        best, worst = best_and_worst(batch, index, settings)
        values.append(losses.simpo_loss(means[best], means[worst], settings.simpo_beta, settings.simpo_gamma))
    return _group_mean(values, out)


def _ranked_groups(batch: Batch, out: StudentOutputs):
    """(student scores [G, n], agreed ranks [G, n]) per group size, groups with a pseudo-label only
    (:func:`labelled_groups`)."""
    means = losses.sequence_means(out.logp, batch.resp_seq, batch.num_sequences, out.computed[LOGP])
    for index, ranks in labelled_groups(batch):
        if index.shape[0]:
            yield means[index], ranks


def rrhf_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """RRHF on the agreed rankings, mean over groups with a pseudo-label (:func:`train.losses.rrhf_loss`).

    CycleAlign's training loss in this project's reconstruction (docs/methods.md): the scores are the
    student's mean token log-probs, the ranking is the agreement of black box and white box.
    """
    values = [losses.rrhf_loss(scores, ranks) for scores, ranks in _ranked_groups(batch, out)]
    return _group_mean(values, out)


def pro_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """PRO's listwise loss on the agreed rankings, mean over groups with a pseudo-label
    (:func:`train.losses.pro_loss`, ``pro_temperature``)."""
    values = [losses.pro_loss(scores, ranks, settings.pro_temperature) for scores, ranks in _ranked_groups(batch, out)]
    return _group_mean(values, out)


def sft_best_term(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """SFT on the top of each agreed ranking: - mean over their tokens of log pi_theta (RRHF's and PRO's SFT
    term; without it RRHF degenerates)."""
    return token_mean(-out.logp, best_rows(batch))


def token_mean_term(name: str, weight: float, quantity: str, sequence_set: str, role: int | None,
                    needs: Mapping[str, tuple[str, ...]]) -> Term:
    """A term that is the mean of the per-token quantity ``quantity`` (a :data:`train.losses.TOKEN_TERMS` name)
    over every response token of the sequences of ``sequence_set`` with ``role`` in the batch: KD's and ADPA's
    form, and what a new per-token loss needs (its function and entry in :data:`train.losses.TOKEN_TERMS`,
    this, and its line in :data:`METHODS`)."""

    def loss(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
        return token_mean(out.values[quantity], response_rows(batch, sequence_set, role))

    return Term(name, weight, needs, (TokenRequest(quantity, sequence_set, role),), loss,
                over_tokens(sequence_set, role))


def kd_term(name: str, weight: float, sequence_set: str, role: int | None) -> Term:
    """KD's term: the mean over every response token of the sequences of ``sequence_set`` with ``role`` of the
    row's distillation loss (:func:`distillation_rows`): the tail-bucket KL on rows whose teacher token is the
    student's (every row of a store of one tokenizer), and across tokenizers ULD or the chunk likelihood on the
    others (``cross_tokenizer_loss``)."""

    def loss(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
        return token_mean(distillation_rows(batch, out, settings), response_rows(batch, sequence_set, role))

    return Term(name, weight, {sequence_set: (TEACHER,)}, (TokenRequest(KD, sequence_set, role),), loss,
                over_tokens(sequence_set, role))


SFT = Term("sft", 1.0, {PAIRS: ()}, (TokenRequest(LOGP, PAIRS, CHOSEN),), sft_term, over_tokens(PAIRS, CHOSEN))
# KD(y_w), KD(y_l): the tail-bucket KL(p_T || q_theta) over the teacher's top-K and a tail bin
# (:func:`train.losses.kd_tail_kl`; the ADPA repository's ``get_kl_loss`` with TRL's tail bucket), on the
# chosen and the rejected response: DCKD's two KL constraints (ADPA paper; ``docs/methods.md``); across
# tokenizers ULD or chunks on the rows without an exact teacher token (:func:`distillation_rows`)
KD_CHOSEN = kd_term("kd_chosen", 1.0, PAIRS, CHOSEN)
KD_REJECTED = kd_term("kd_rejected", 1.0, PAIRS, REJECTED)
# L_ADPA = - mean_t sum_k pi_theta(topk_ids[t,k] | s_t) A[t,k] over the student's generated answers, with
# A = adpa_beta * (teacher/topk_logp - reference/topk_logp) clipped into [1e-8, 1 - 1e-8] unless adpa_unclipped
# (ADPA paper, "Advantage-Guided Distillation for Preference Alignment in Small Language Models"; clip from the
# released code; ``docs/methods.md``); the advantage is :func:`adpa_advantage_rows`, per token
# :func:`train.losses.adpa_token_loss`
ADPA_TERM = token_mean_term("adpa", 1.6, ADPA, GENERATED, GENERATED_ROLE, {GENERATED: (TEACHER, REFERENCE)})
_BOTH_RESPONSES = (TokenRequest(LOGP, PAIRS, CHOSEN), TokenRequest(LOGP, PAIRS, REJECTED))
DPO = Term("dpo", 1.0, {PAIRS: (STUDENT_INIT,)}, _BOTH_RESPONSES, dpo_term, OVER_PAIRS)
SIMPO = Term("simpo", 1.0, {PAIRS: ()}, _BOTH_RESPONSES, simpo_term, OVER_PAIRS)
_ALL_SAMPLES = (TokenRequest(LOGP, SAMPLES, None),)


def pad_reward_sections(settings: Settings) -> tuple[str, ...]:
    """The ``samples`` sections PAD's teacher reward reads (:func:`teacher_rewards`): ``teacher`` (the log-prob
    sums) for alpha > 0, ``teacher_mcq`` (the calibration) for alpha < 1; a part of weight 0 is not read."""
    return tuple(section for section, read in ((TEACHER, settings.pad_alpha != 0),
                                               (TEACHER_MCQ, settings.pad_alpha != 1)) if read)


# the teacher reward's sections by alpha (`--passes pad` writes both, pad_logp the sums, pad_mcq the calibration)
PAD = Term("pad", 1.0, {SAMPLES: (TEACHER, TEACHER_MCQ)}, _ALL_SAMPLES, pad_term, OVER_GROUPS,
           lambda settings: {SAMPLES: pad_reward_sections(settings)})
PAD_DPO = Term("pad_dpo", 1.0, {SAMPLES: (TEACHER, TEACHER_MCQ, STUDENT_INIT)}, _ALL_SAMPLES, pad_dpo_term,
               OVER_GROUPS, lambda settings: {SAMPLES: (*pad_reward_sections(settings), STUDENT_INIT)})
PAD_SIMPO = Term("pad_simpo", 1.0, {SAMPLES: (TEACHER, TEACHER_MCQ)}, _ALL_SAMPLES, pad_simpo_term, OVER_GROUPS,
                 lambda settings: {SAMPLES: pad_reward_sections(settings)})
RRHF = Term("rrhf", 1.0, {SAMPLES: (JUDGE,)}, _ALL_SAMPLES, rrhf_term, OVER_LABELLED_GROUPS)
PRO = Term("pro", 1.0, {SAMPLES: (JUDGE,)}, _ALL_SAMPLES, pro_term, OVER_LABELLED_GROUPS)
SFT_BEST = Term("sft_best", 1.0, {SAMPLES: (JUDGE,)}, _ALL_SAMPLES, sft_best_term, OVER_BEST_TOKENS)

METHODS: dict[str, tuple[Term, ...]] = {
    "sft": (SFT,),
    "kd": (KD_CHOSEN,),
    "dckd": (SFT, KD_CHOSEN, KD_REJECTED),
    "dpo": (DPO,),
    "simpo": (SIMPO,),
    "adpa": (SFT, ADPA_TERM),
    "pad": (PAD,),
    "pad_dpo": (PAD_DPO,),
    "pad_simpo": (PAD_SIMPO,),
    "cyclealign": (RRHF, SFT_BEST),  # the reconstruction's default ranking loss (docs/methods.md)
    "rrhf": (RRHF, SFT_BEST),
    "pro": (PRO, SFT_BEST),
}

#: the commands that write store signals, in the order they must run (the groups are sampled before the teacher
#: or a judge reads them)
SAMPLE, TEACHER_COMMAND, RANK = "precompute sample", "precompute teacher", "precompute rank"
#: which command writes each store signal (``set/section``, ``set/base`` for a set's own arrays), and for
#: ``precompute teacher`` the ``--passes`` value; every signal a term may read is here (tests check it)
WRITER: dict[str, tuple[str, str | None]] = {
    f"{PAIRS}/{fmt.BASE}": (TEACHER_COMMAND, "pairs"), f"{PAIRS}/{TEACHER}": (TEACHER_COMMAND, "pairs"),
    f"{PAIRS}/{STUDENT_INIT}": (TEACHER_COMMAND, "dpo_ref"),
    f"{GENERATED}/{fmt.BASE}": (TEACHER_COMMAND, "adpa"), f"{GENERATED}/{TEACHER}": (TEACHER_COMMAND, "adpa"),
    f"{GENERATED}/{REFERENCE}": (TEACHER_COMMAND, "adpa"),
    f"{SAMPLES}/{fmt.BASE}": (SAMPLE, None),
    f"{SAMPLES}/{TEACHER}": (TEACHER_COMMAND, "pad_logp"), f"{SAMPLES}/{TEACHER_MCQ}": (TEACHER_COMMAND, "pad_mcq"),
    f"{SAMPLES}/{STUDENT_INIT}": (TEACHER_COMMAND, "dpo_ref"),
    f"{SAMPLES}/{JUDGE}": (RANK, None),
}
#: ``precompute teacher --passes`` values in the order a suggested command lists them; ``pad`` is pad_logp and
#: pad_mcq together (the documented name, kept)
TEACHER_PASSES = ("pairs", "dpo_ref", "adpa", "pad", "pad_logp", "pad_mcq")
PAD_PARTS = ("pad_logp", "pad_mcq")


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


def needs_of(terms: list[Term], settings: Settings | None = None) -> dict[str, list[str]]:
    """Union of the terms' store needs: ``{set: [sections]}`` in format order; with ``settings``, only what the
    terms read with them (:attr:`Term.settings_needs`: PAD at alpha 1 reads no calibration)."""
    wanted: dict[str, set[str]] = {}
    for term in terms:
        for sequence_set, sections in term.needs_with(settings).items():
            wanted.setdefault(sequence_set, set()).update(sections)
    return {s: [sec for sec in fmt.SECTIONS if sec in wanted[s]] for s in fmt.SEQUENCE_SETS if s in wanted}


def token_requests(terms: list[Term]) -> tuple[TokenRequest, ...]:
    return tuple(dict.fromkeys(r for t in terms for r in t.tokens))


# --------------------------------------------------------------------------- the student forward


def kept_rows(batch: Batch, rows: torch.Tensor) -> torch.Tensor | None:
    """[n, K] bool: the teacher's kept top-K entries on response rows ``rows``, or None when every entry of every
    row is kept.

    A store written with an adaptive K (``precompute teacher --top-p``) holds ``teacher/topk_count``: row ``r``
    keeps its first ``topk_count[r]`` entries, the rest is padding (:func:`train.losses.kept_entries`). Rows whose
    section has no count (fixed K, older stores) keep all K.
    """
    if losses.TOPK_COUNT not in batch.response:
        return None
    k = batch.response[losses.TOPK_IDS].shape[1]
    kept = losses.kept_entries(batch.response[losses.TOPK_COUNT][rows], k)
    return kept | ~batch.has[losses.TOPK_COUNT][rows].unsqueeze(-1)


def topk_ids_rows(batch: Batch, rows: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[n, K] the teacher's top-K ids on response rows ``rows``, padding (entries past a row's kept count)
    replaced by the row's first id (:func:`train.losses.kept_ids`): what KD and ADPA gather the student at."""
    ids = _signal(batch, losses.TOPK_IDS, rows)
    kept = kept_rows(batch, rows)
    return ids if kept is None else losses.kept_ids(ids, kept)


def adpa_advantage_rows(batch: Batch, rows: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[n, K] ADPA's advantage on response rows ``rows``: :func:`train.losses.adpa_advantage` of the
    teacher's and the reference's top-K log-probs with ``adpa_beta``, clipped unless ``adpa_unclipped``;
    0 on padded entries (:func:`kept_rows`)."""
    return losses.adpa_advantage(_signal(batch, fmt.signal_name(TEACHER, fmt.ARRAY_TOPK_LOGP), rows),
                                 _signal(batch, fmt.signal_name(REFERENCE, fmt.ARRAY_TOPK_LOGP), rows),
                                 beta=settings.adpa_beta, clip=not settings.adpa_unclipped,
                                 kept=kept_rows(batch, rows))


def kd_teacher_rows(batch: Batch, rows: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[n, K+1] the teacher's KD bins on response rows ``rows``: :func:`train.losses.teacher_kd_bins` of the
    stored top-K log-probs and the stored exact tail ``teacher/tail_logp`` on rows whose store has it (format
    version >= 2), the tail from the top-K on the others; padded entries (:func:`kept_rows`) are ``-inf``;
    renormalised over the bins."""
    topk_logp = _signal(batch, losses.TOPK_LOGP, rows)
    kept = kept_rows(batch, rows)
    if losses.TAIL_LOGP not in batch.response:
        return losses.teacher_kd_bins(topk_logp, kept=kept)
    return losses.teacher_kd_bins(topk_logp, batch.response[losses.TAIL_LOGP][rows],
                                  batch.has[losses.TAIL_LOGP][rows], kept=kept)


def uld_teacher_rows(batch: Batch, rows: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[n, K] ULD's teacher side on response rows ``rows``: the teacher's own top-K probabilities at the aligned
    teacher row (``teacher/teacher_topk_logp``), 0 at padding (the floor: past an adaptive K, rows without one)."""
    logp = _signal(batch, TEACHER_TOPK_LOGP, rows)
    return torch.where(logp > fmt.LOGP_FLOOR + 1, logp.exp(), torch.zeros_like(logp))


def kd_sample_teacher_rows(batch: Batch, rows: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[n, S] the teacher's log-probs of the tail samples on response rows ``rows``, on the scale of
    :func:`kd_teacher_rows` (:func:`train.losses.teacher_kd_sample_logp`: divided by the same total)."""
    return losses.teacher_kd_sample_logp(_signal(batch, losses.TOPK_LOGP, rows), _signal(batch, losses.TAIL_LOGP, rows),
                                         _signal(batch, losses.TAIL_SAMPLE_LOGP, rows), kept=kept_rows(batch, rows))


def kd_rows_by_tail(batch: Batch, kd_rows: torch.Tensor, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """([R] bool, [R] bool): of the response rows ``kd_rows`` that KD is asked on, those whose tail is one bin
    (:func:`train.losses.kd_tail_kl`, quantity ``kd``) and those whose tail is estimated from the store's tail
    samples (:func:`train.losses.kd_sampled_kl`, quantity ``kd_sampled``).

    ``settings.kd_tail``: ``auto`` (the default) uses the samples on every row whose store has them, ``bin``
    never, ``samples`` on every row (a row without them is an error; ``train student`` refuses such a store
    before a model loads). The estimate replaces the bin: the bin is its coarse-grained form (the tail's
    total alone), and the two together would count the tail twice.
    """
    has = batch.has.get(losses.TAIL_SAMPLE_IDS)
    if settings.kd_tail == KD_TAIL_BIN or has is None:
        sampled = torch.zeros_like(kd_rows)
    else:
        sampled = kd_rows & has.to(kd_rows.device)
    if settings.kd_tail == KD_TAIL_SAMPLES and bool((kd_rows & ~sampled).any()):
        raise ValueError(f"--kd-tail {KD_TAIL_SAMPLES}: the batch has KD rows without tail samples (precompute "
                         f"teacher --tail-samples S writes them)")
    return kd_rows & ~sampled, sampled


#: row signals that are not store arrays as stored, computed before the chunk loop:
#: name -> (batch, rows, settings) -> [n, ...]
DERIVED_SIGNALS: dict[str, Callable[[Batch, torch.Tensor, Settings], torch.Tensor]] = {
    losses.TARGET_IDS: lambda batch, rows, settings: batch.resp_target[rows],
    losses.TOPK_IDS: topk_ids_rows,
    losses.ADVANTAGE: adpa_advantage_rows,
    losses.KD_TEACHER: kd_teacher_rows,
    losses.ULD_TEACHER: uld_teacher_rows,
    losses.KD_SAMPLE_TEACHER: kd_sample_teacher_rows,
}


# --------------------------------------------------------------------------- across tokenizers

#: a cross-tokenizer store's per-row signals (store.format DESCRIPTION "cross_tokenizer")
ALIGNMENT = fmt.signal_name(TEACHER, fmt.ARRAY_ALIGNMENT)
TEACHER_TOPK_LOGP = fmt.signal_name(TEACHER, fmt.ARRAY_TEACHER_TOPK_LOGP)
CHUNK_LENGTH = fmt.signal_name(TEACHER, fmt.ARRAY_CHUNK_LENGTH)
CHUNK_LOGP = fmt.signal_name(TEACHER, fmt.ARRAY_CHUNK_LOGP)


def aligned_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(code [R], aligned [R] bool)``: each response row's alignment code and whether its section was aligned
    across tokenizers (rows of a store of one tokenizer: not aligned, code meaningless)."""
    if ALIGNMENT not in batch.response:
        zeros = torch.zeros(batch.num_response_tokens, dtype=torch.long, device=batch.resp_seq.device)
        return zeros, zeros.bool()
    return batch.response[ALIGNMENT].long(), batch.has[ALIGNMENT]


def token_level_rows(batch: Batch, settings: Settings) -> torch.Tensor:
    """[R] bool: rows where KD and ADPA read the teacher's top-K: every row of a store of one tokenizer; across
    tokenizers, the rows with an exactly matching teacher token whose top-K the map sends at least one id of."""
    code, aligned = aligned_rows(batch)
    if not bool(aligned.any()):
        return ~aligned
    mapped = batch.response[losses.TOPK_COUNT] > 0 if losses.TOPK_COUNT in batch.response else torch.ones_like(aligned)
    return ~aligned | ((code == fmt.ALIGN_EXACT) & mapped)


def uld_rows(batch: Batch, settings: Settings) -> torch.Tensor:
    """[R] bool: ULD's rows (``cross_tokenizer_loss`` uld): aligned rows that start together with a teacher token,
    or match one exactly but keep nothing of its top-K in the student's vocabulary."""
    code, aligned = aligned_rows(batch)
    if settings.cross_tokenizer_loss != "uld" or not bool(aligned.any()):
        return torch.zeros_like(aligned)
    return aligned & ~token_level_rows(batch, settings) & (code != fmt.ALIGN_NONE)


def chunk_spans(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends [C], lengths [C])``: the last response row of every aligned chunk of the batch and its number of rows
    (``teacher/chunk_length``; a chunk's rows are consecutive rows of one sequence)."""
    _, aligned = aligned_rows(batch)
    if CHUNK_LENGTH not in batch.response:
        empty = torch.zeros(0, dtype=torch.long, device=aligned.device)
        return empty, empty
    lengths = torch.where(aligned, batch.response[CHUNK_LENGTH].long(), torch.zeros_like(aligned, dtype=torch.long))
    ends = lengths.nonzero().squeeze(1)
    return ends, lengths[ends]


def chunk_rows(batch: Batch, settings: Settings) -> torch.Tensor:
    """[R] bool: the rows of chunks the chunk likelihood covers (``cross_tokenizer_loss`` chunk): every row of an
    aligned chunk, except a chunk of one row whose KD reads the teacher's top-K (:func:`token_level_rows`)."""
    _, aligned = aligned_rows(batch)
    if settings.cross_tokenizer_loss != "chunk" or not bool(aligned.any()):
        return torch.zeros_like(aligned)
    ends, lengths = chunk_spans(batch)
    step = torch.zeros(aligned.shape[0] + 1, dtype=torch.long, device=aligned.device)
    step.index_add_(0, ends - lengths + 1, torch.ones_like(ends))
    step.index_add_(0, ends + 1, -torch.ones_like(ends))
    return (step.cumsum(0)[:-1] > 0) & ~token_level_rows(batch, settings)


def route_across_tokenizers(wanted: dict[str, torch.Tensor], batch: Batch, settings: Settings) -> None:
    """Where a batch holds rows aligned across tokenizers, the rows asked for (``wanted``: quantity -> [R] bool,
    changed in place) go where their signal is: KD keeps the rows whose teacher top-K it reads
    (:func:`token_level_rows`), the other KD rows go to ULD or CHUNK (``cross_tokenizer_loss``: :func:`uld_rows`,
    :func:`chunk_rows`), ADPA keeps the token-level rows only. A batch of one tokenizer is left as it is."""
    _, aligned = aligned_rows(batch)
    if not bool(aligned.any()):
        return
    token_level = token_level_rows(batch, settings)
    asked = wanted[KD]
    wanted[KD] = asked & token_level
    wanted[ULD] = wanted[ULD] | (asked & uld_rows(batch, settings))
    wanted[CHUNK] = wanted[CHUNK] | (asked & chunk_rows(batch, settings))
    wanted[ADPA] = wanted[ADPA] & token_level


def chunk_losses(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """[R]: on the last row of each chunk :func:`chunk_rows` covers, :func:`train.losses.chunk_likelihood_loss` of
    the student's chunk log-prob (the sum of ``out.chunk`` over its rows) and the teacher's
    (``teacher/chunk_logp``); 0 elsewhere."""
    values = out.values[CHUNK]
    covered = out.computed[CHUNK]
    if not bool(covered.any()):
        return torch.zeros_like(values)
    ends, lengths = chunk_spans(batch)
    keep = covered[ends]
    ends, lengths = ends[keep], lengths[keep]
    running = torch.cat([values.new_zeros(1), values.cumsum(0)])
    student = running[ends + 1] - running[ends + 1 - lengths]
    teacher = batch.response[CHUNK_LOGP][ends].to(student.dtype)
    return values.new_zeros(values.shape).index_put((ends,), losses.chunk_likelihood_loss(student, teacher)
                                                   .to(values.dtype))


def distillation_rows(batch: Batch, out: StudentOutputs, settings: Settings) -> torch.Tensor:
    """[R] KD's value per response row: the tail-bucket KL (``out.kd``) where the teacher's top-K is read, ULD
    (``out.uld``) or the chunk likelihood (on a chunk's last row) elsewhere across tokenizers, 0 on rows none of
    them covers. On a store of one tokenizer this is ``out.kd`` exactly."""
    values = out.values[KD]
    if bool(out.computed[ULD].any()):
        values = values + out.values[ULD]
    if bool(out.computed[CHUNK].any()):
        values = values + chunk_losses(batch, out, settings)
    return values


def row_signals(batch: Batch, names, rows: torch.Tensor, settings: Settings) -> dict[str, torch.Tensor]:
    """The row signals ``names`` on response rows ``rows``: derived (:data:`DERIVED_SIGNALS`) or read from the store."""
    return {name: (DERIVED_SIGNALS[name](batch, rows, settings) if name in DERIVED_SIGNALS
                   else _signal(batch, name, rows))
            for name in names}


def rows_by_need(wanted: dict[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """Response rows grouped by the set of quantities they need: ``[(names, rows [n])]``, rows needing none left out.

    ``wanted``: quantity -> [R] bool. :func:`student_outputs` runs its one output-layer pass over the groups'
    rows in this order, so that each quantity's rows lie together.
    """
    names = list(wanted)
    need = torch.stack([wanted[name] for name in names], 1).long()  # [R, Q]
    combinations, group_of_row = torch.unique(need, dim=0, return_inverse=True)
    return [([name for name, used in zip(names, combination) if used], (group_of_row == g).nonzero().squeeze(1))
            for g, combination in enumerate(combinations.tolist()) if any(combination)]


def autocast_for(device: str, dtype: torch.dtype):
    """The context the student's forward (and backward) runs in: ``torch.autocast`` to ``dtype``, none for float32."""
    return torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()


def student_outputs(model, batch: Batch, requests: tuple[TokenRequest, ...], settings: Settings,
                    chunk_size: int = 1024) -> StudentOutputs:
    """Run the student on ``batch`` and compute the requested per-token quantities.

    1. rows: per quantity, the union of its requests' response rows (across tokenizers,
       KD's rows without an exact teacher token go to ULD or CHUNK:
       :func:`route_across_tokenizers`); every such row gets ``logp`` too (a gather of the
       same log-softmax: free);
    2. the decoder (:func:`lm.head.split_model`) runs only over the sequences that own
       such rows, trimmed to their longest length;
    3. one output-layer pass over every such row, in chunks
       (:func:`train.losses.chunked_token_terms`): the hidden states at ``resp_pos``, ordered
       by the set of quantities they need (:func:`rows_by_need`), go through the output
       layer (:meth:`lm.head.OutputLayer.logits`) once, and each quantity is computed on
       its own rows of each chunk, with the row signals it reads (:func:`row_signals`, each
       derived on the rows of the quantities that read it). Pair rows (KD) and generated
       rows (ADPA) thus share the chunks: one pass, one gradient of the output weight
       (with tied embeddings, the [V, H] matrix), not one per group of rows.

    Shapes: every output is [R] (R = batch.num_response_tokens), float32 (float64 for a
    float64 model).
    """
    R, device = batch.num_response_tokens, batch.input_ids.device
    wanted = {name: torch.zeros(R, dtype=torch.bool, device=device) for name in losses.TOKEN_TERMS}
    for request in requests:
        wanted[request.quantity] |= response_rows(batch, request.sequence_set, request.role)
    route_across_tokenizers(wanted, batch, settings)
    # KD on rows with tail samples is their estimate (--kd-tail): ``kd`` reports both kinds of rows (below)
    wanted[KD], sampled = kd_rows_by_tail(batch, wanted[KD], settings)
    wanted[losses.KD_SAMPLED] |= sampled
    wanted[LOGP] = torch.stack(list(wanted.values())).any(0)
    if not bool(wanted[LOGP].any()):
        zeros = torch.zeros(R, dtype=torch.float32, device=device)
        return StudentOutputs(dict.fromkeys(wanted, zeros), wanted)

    run = torch.zeros(batch.num_sequences, dtype=torch.bool, device=device)
    run[batch.resp_seq[wanted[LOGP]]] = True
    run_index = run.nonzero().squeeze(1)
    position_in_run = torch.cumsum(run.long(), 0) - 1  # sequence -> its row in the decoder batch
    length = int(batch.attention_mask[run_index].sum(1).max())
    decoder, output_layer = head.split_model(model)
    # no KV cache: a training forward has no later token to serve (a cache would copy every layer's keys and values)
    hidden = decoder(input_ids=batch.input_ids[run_index, :length],
                     attention_mask=batch.attention_mask[run_index, :length], use_cache=False).last_hidden_state
    zeros = torch.zeros(R, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32, device=device)
    values = dict.fromkeys(wanted, zeros)

    order = torch.cat([rows for _, rows in rows_by_need(wanted)])  # every row some quantity needs, grouped by need
    names = [name for name in wanted if bool(wanted[name].any())]
    rows_of = {name: wanted[name][order] for name in names}  # [n] bool each, along ``order``
    signal_rows: dict[str, torch.Tensor] = {}
    for name in names:
        for signal in losses.TOKEN_TERMS[name].reads:
            signal_rows[signal] = signal_rows.get(signal, torch.zeros_like(rows_of[name])) | rows_of[name]
    signals = {}
    for signal, need in signal_rows.items():
        got = row_signals(batch, [signal], order[need], settings)[signal]
        if not bool(need.all()):  # rows of other quantities: never read (zeros keep ids in range)
            got = got.new_zeros((order.shape[0],) + got.shape[1:]).index_put((need.nonzero().squeeze(1),), got)
        signals[signal] = got
    picked = hidden[position_in_run[batch.resp_seq[order]], batch.resp_pos[order]]
    got = losses.chunked_token_terms(picked, output_layer.logits, names, signals, chunk_size, rows=rows_of)
    for name, value in got.items():
        values[name] = zeros.index_put((order,), value.to(zeros.dtype))
    return _with_sampled_kd(StudentOutputs(values, wanted))


def _with_sampled_kd(out: StudentOutputs) -> StudentOutputs:
    """``out`` with ``kd`` holding, on rows computed as ``kd_sampled`` (:func:`kd_rows_by_tail`), their value: KD's
    terms (and ``train evaluate``'s KL) read ``kd`` whichever way the tail was counted; ``computed["kd_sampled"]``
    still says which rows were estimated."""
    sampled = out.computed[losses.KD_SAMPLED]
    if bool(sampled.any()):
        out.values[KD] = torch.where(sampled, out.values[losses.KD_SAMPLED], out.values[KD])
        out.computed[KD] = out.computed[KD] | sampled
    return out


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
