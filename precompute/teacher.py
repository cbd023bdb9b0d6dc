"""``precompute teacher``: dataset -> encoded parts -> model passes -> store.

A run is a list of *steps*; each writes one section of one sequence set for
every part of every split (see :mod:`store.format`):

=================== =================== ==========================================
pass (``--passes``)  step                what it writes
=================== =================== ==========================================
(always)            pairs/base          chosen and rejected, tokenised
pairs               pairs/teacher       teacher top-K, target log-probs, sums
dpo_ref             pairs/student_init  the student's initial model's sums (DPO)
adpa                generated/base      the student's greedy answer per prompt
adpa                generated/teacher   teacher top-K on those answers
adpa                generated/reference reference model at the teacher's ids
pad_logp            samples/teacher     teacher log-probs on ``precompute sample``'s groups
pad_mcq             samples/teacher_mcq the teacher's pairwise judgements (PAD's s_mcq)
pad                 both of the above   pad_logp and pad_mcq
=================== =================== ==========================================

The pad passes need a store that ``precompute sample`` filled (set ``samples``)
and are refused before any model loads without one. A pad-only run takes
prompt-only rows and writes no pairs; the pairs base is written only when
pairs, dpo_ref or adpa is asked. The calibration step (its prompt, template
and how the answer is read) lives in :mod:`precompute.calibration`; it is the
most expensive pad step and only PAD's teacher reward at alpha < 1 reads it,
so ``pad_logp`` alone serves training at ``--pad-alpha 1`` (and a teacher with
no token for the letters, which cannot answer the calibration's question).
Readers derive a response's mean teacher log-prob as ``logp_sum / response_length``.

``--top-k`` is checked against the teacher's vocabulary for the passes whose
top-K a reader uses (pairs, adpa). The samples' teacher section keeps the same
arrays, but no reader uses its top-K (PAD reads the sums): its K is
``min(--top-k, vocabulary)`` (:meth:`TeacherContext.top_k_of`).

How the code is laid out: :func:`prepare` does everything cheap and checkable
(rows, models resolved, tokenizers compared, the store opened) and returns a
:class:`TeacherContext`, the explicit input of every step; :func:`plan_steps`
lists the steps the passes need; each step is a function
``(ctx, step, split, part, model, progress) -> StepResult``; :func:`run_steps` loads
each model once, runs its steps over the parts not yet complete and writes
them. Models are loaded one at a time, grouped so each loads once where it can:
the student first (DPO sums, generation), then the teacher, then the reference
(after the teacher, because it is read at the teacher's top-K ids). A step
skips parts whose section is already complete, which is the whole of resuming.
Each part's arrays are written by a background thread while the model works on
the next part.

``--cluster SPEC`` runs the same steps on a dask.distributed cluster
(:mod:`precompute.cluster`): :func:`prepare` and the pair bases stay on the
coordinator, each part of each step becomes a unit of work
(:func:`run_steps_on_cluster`, :func:`compute_part`) that a worker computes and
writes into the store itself; a part that reads another step's section of the
same part (:data:`READS`) waits for that unit only. ``--device-map auto`` loads
each model sharded over the process's (or worker's) GPUs with accelerate.

``--engine vllm`` (:mod:`lm.engines`) runs the student's greedy answers
(generated/base) and the teacher's top-K (``*/teacher``) on a vLLM engine
(``--tensor-parallel N`` GPUs per engine for a teacher larger than one GPU):
the top-K from its prompt log-probs, the tail from what they leave
(:func:`precompute.scoring.score_with_engine`). The other steps stay on
transformers: the student's initial sums, the MCQ calibration and the
reference at the teacher's ids (vLLM 0.32 scores given ids only with its V2
model runner, which needs Triton: not on CPU, untested here). Their pass
records name the engine, so a store never mixes engines within a pass.

Every section gets a content key when it is written (:func:`content_key`,
:func:`pairs_base_key`; :mod:`store.keys` defines what goes into each).
``--reuse-from LOCATION`` (and ``$DISTILL_REUSE_FROM``): before a step runs,
each part whose key another store there holds is copied from it, verified,
instead of computed (:func:`_reuse_parts`); a step left with no part to compute
loads no model. On a cluster the coordinator does this before submitting: a
reused part is no unit (a part whose inputs are computed in the same run, such
as the teacher on answers generated now, has no key yet and is computed).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import click
import numpy as np
from tqdm.auto import tqdm

from lm import chat, engines, models
from lm.head import check_split
from lm.options import (BatchTokensOption, ClusterOption, DataOptions, EngineOptions, LayoutOptions, ProgressOption,
                        ReuseOptions, RunOptions, comma_list, setting)
from store import ModelRecord, PassRecord, ProvenanceMismatch, TeacherStore, TokenizerMismatchError
from store import format as fmt
from store import keys
from store.format import SectionRef
from store.provenance import PASS_ENCODE
from store.sequences import base_arrays, split_sequences

from . import calibration, scoring, xtok
from .dataset import LoadedSplit, Row, dataset_identity, load_data
from .provenance import prompts_fingerprint
from .reuse import Reuse
from .stores import check_samples_match, open_store, record_sample_counts, require_samples, vocab_size_of
from .summary import StepResult, Summary, finish_summary
from .xtok import CrossTokenizer

PASS_PAIRS = "pairs"
PASS_DPO_REF = "dpo_ref"
PASS_ADPA = "adpa"
PASS_PAD = "pad"  # PASS_PAD_LOGP and PASS_PAD_MCQ together (the documented name, kept)
PASS_PAD_LOGP = "pad_logp"  # the teacher's log-probs of the sampled groups (samples/teacher)
PASS_PAD_MCQ = "pad_mcq"  # PAD's calibration, the teacher's multiple-choice judgements (samples/teacher_mcq)
PAD_PASSES = (PASS_PAD, PASS_PAD_LOGP, PASS_PAD_MCQ)  # passes that read the sampled groups
NEEDS_PAIRS = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA)  # passes that read the dataset's pairs
READS_TOP_K = (PASS_PAIRS, PASS_ADPA)  # passes whose top-K some reader uses: --top-k must fit the vocabulary
DEFAULT_PASSES = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA)
KNOWN_PASSES = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA, PASS_PAD, PASS_PAD_LOGP, PASS_PAD_MCQ)

ROLE_TEACHER, ROLE_STUDENT, ROLE_REFERENCE = "teacher", "student", "reference"
#: the teacher step that draws --tail-samples: the pairs' top-K is what KD reads (ADPA reads the generated
#: answers' top-K ids alone, PAD the samples' sums)
TAIL_SAMPLED_STEPS = (fmt.PASS_PAIRS_TEACHER,)
TAIL_SAMPLES_MAX = 4096  # a bound on the [rows, S] arrays, far above the 12 or so the method wants
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for --device-map


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(DataOptions, LayoutOptions, RunOptions, BatchTokensOption, EngineOptions, ClusterOption,
                    ReuseOptions, ProgressOption):
    """Settings of ``precompute teacher``; each field is also its command-line option."""

    out: str = setting(help="Store path or fsspec URL (created, or completed if it exists).", required=True)
    teacher: str | None = setting(None, "Teacher: model dir, .gguf file or cached name "
                                        "[embedded SmolLM2-135M-Instruct].")
    student: str | None = setting(None, "Student's initial model (DPO reference, ADPA answers) "
                                        "[embedded demo student].")
    reference: str | None = setting(None, "ADPA reference model (e.g. the teacher's SFT checkpoint) "
                                          "[the student's initial model].")
    passes: tuple[str, ...] = setting(DEFAULT_PASSES, f"Comma list of {', '.join(KNOWN_PASSES)} (pad: pad_logp and "
                                                       "pad_mcq, the calibration).", parse=comma_list)
    top_k: int = setting(50, "Teacher log-probs kept per response token (0: none, a pure sampled store, with "
                             "--tail-samples).", type=click.IntRange(min=0))
    top_p: float = setting(1.0, "Adaptive K: keep per token the fewest of the top-K ids whose teacher mass reaches "
                                "P (--top-k the cap), the rest in the exact tail; 1.0: always K.",
                           type=click.FloatRange(min=0, max=1, min_open=True))
    tail_samples: int = setting(0, "KD's tail samples: ids per response token drawn from the teacher's "
                                   "distribution outside the kept top-K, with their log-probs (pairs/teacher); "
                                   "0: none.", type=click.IntRange(min=0, max=TAIL_SAMPLES_MAX))
    tail_seed: int = setting(0, "Seed of the tail samples: part p of train draws with seed + p.",
                             type=click.IntRange(min=0))
    max_new_tokens: int = setting(64, "Length limit of generated answers (ADPA); raise it for real teachers.",
                                  type=click.IntRange(min=1))
    generation_batch: int = setting(64, "Prompts per generate() call.", type=click.IntRange(min=1))
    device_map: str | None = setting(None, "Shard each model over the GPUs of its process or worker with "
                                           "accelerate (teachers larger than one GPU): auto.",
                                     type=click.Choice(DEVICE_MAPS))
    mcq_template: str | None = setting(None, "PAD: multiple-choice prompt with {question}, {option_a}, {option_b} "
                                             "[precompute/templates/mcq.txt].",
                                       type=click.Path(dir_okay=False))
    cross_tokenizer: bool = setting(False, "Allow a teacher whose tokenizer differs from the student's: it scores each "
                                           "response's text in its own template and tokens, the store keeps the "
                                           "student's ids (docs/precompute.md, 'Teacher and student from different "
                                           "families').", is_flag=True)

    def sequence_length(self) -> int:
        """The longest sequence a pass reads or generates (a vLLM engine's max_model_len)."""
        return max(self.max_length, chat.MIN_PROMPT_TOKENS + self.max_new_tokens)


@dataclass(frozen=True)
class Step:
    name: str  # "<set>/<section>"
    sequence_set: str
    section: str
    model_role: str  # which model computes it
    run: Callable[["TeacherContext", "Step", str, int, object, Callable[[int], None]], StepResult]


@dataclass
class TeacherContext:
    """Everything a step reads, decided before any model runs."""

    config: TeacherConfig
    store: TeacherStore
    tokenizer: object
    models: dict[str, models.ModelInfo]  # role -> resolved model
    rows: dict[str, LoadedSplit]  # the rows the parts are made of (pairs, or prompts for a pad-only run)
    device: str
    dtype: str  # "float32", "bfloat16", ...
    eot_ids: list[int]  # every id that ends the generating model's turn, the template's own first
    pad_id: int
    prompt_rows: dict[str, LoadedSplit] = field(default_factory=dict)  # pad: the questions asked
    mcq: calibration.McqSetup | None = None  # pad: template, letter tokens, question budget
    reuse: Reuse | None = None  # --reuse-from: sections of other stores with the same content key
    vocab: int | None = None  # ids the teacher's output holds (None: not known, --top-k as given)
    xtok: CrossTokenizer | None = None  # --cross-tokenizer with another tokenizer: the teacher reads text (precompute.xtok)

    def top_k_of(self, step: "Step") -> int:
        """The K a teacher step keeps: ``--top-k``, at most the vocabulary for the samples' (module docstring)."""
        if step.sequence_set == fmt.SET_SAMPLES and self.vocab is not None:
            return min(self.config.top_k, self.vocab)
        return self.config.top_k

    def rows_of_part(self, split: str, part: int, *, prompts: bool = False) -> list[Row]:
        """The rows of examples [start, stop) of ``part`` that survived loading, in index order."""
        loaded = (self.prompt_rows if prompts else self.rows)[split]
        start, stop = self.store.part_range(split, part)
        return [r for r in loaded.rows if start <= r.index < stop]


# --------------------------------------------------------------------------- steps

def topk_step(ctx: TeacherContext, step: Step, split: str, part: int, model, progress) -> StepResult:
    """The teacher's top-K, target log-probs and sums over the set's responses."""
    if ctx.xtok is not None:  # another tokenizer: the responses' text (precompute.xtok)
        return xtok.topk_step(ctx, step, split, part, model, progress)
    seqs, prompts = split_sequences(ctx.store.read_section(split, part, step.sequence_set))
    if isinstance(model, engines.VllmEngine):
        scored = scoring.score_with_engine(model, seqs, prompts, top_k=ctx.top_k_of(step), top_p=ctx.config.top_p,
                                           on_batch=progress)
    else:
        scored = scoring.score_sequences(model, seqs, prompts, top_k=ctx.top_k_of(step), top_p=ctx.config.top_p,
                                         tail_uniforms=tail_uniforms(ctx, step, split, part, seqs, prompts),
                                         batch_tokens=ctx.config.batch_tokens, pad_id=ctx.pad_id, on_batch=progress)
    groups = _groups(ctx, split, part) if step.sequence_set == fmt.SET_SAMPLES else 0
    return StepResult(scoring.scored_arrays(scored, topk=True), sum(map(len, seqs)), groups=groups,
                      attrs=_engine_attrs(model))


def tail_samples_of(ctx: TeacherContext, step: Step) -> int:
    """The tail samples per row that ``step`` draws: ``--tail-samples`` for :data:`TAIL_SAMPLED_STEPS`, else 0."""
    return ctx.config.tail_samples if step.name in TAIL_SAMPLED_STEPS else 0


def tail_part_seed(ctx: TeacherContext, split: str, part: int) -> int:
    """The seed ``part`` of ``split`` draws its tail samples with: ``--tail-seed`` + part (+ crc32 of the split's name
    for splits other than train, as ``precompute sample`` seeds its parts), modulo 2**63."""
    from .sample import part_seed

    return part_seed(ctx.config.tail_seed, split, part)


def tail_uniforms(ctx: TeacherContext, step: Step, split: str, part: int, seqs, prompts) -> list[np.ndarray] | None:
    """Per sequence, [r, S] uniforms in [0, 1) at which its response rows' tail samples are drawn, or None.

    One float64 draw per (response row of the part, sample), in the section's row order, from the part's seed
    (:func:`tail_part_seed`): a part draws the same ids however its rows are batched, resumed or spread over a
    cluster (``store.format.DESCRIPTION["tail_samples"]`` states the rule).
    """
    samples = tail_samples_of(ctx, step)
    if not samples:
        return None
    lengths = [len(seq) - int(prompt) for seq, prompt in zip(seqs, prompts)]
    drawn = np.random.default_rng(tail_part_seed(ctx, split, part)).random((sum(lengths), samples))
    return np.split(drawn, np.cumsum(lengths)[:-1]) if lengths else []


def sums_step(ctx: TeacherContext, step: Step, split: str, part: int, model, progress) -> StepResult:
    """The student's initial model's target log-probs and sums (DPO's reference)."""
    seqs, prompts = split_sequences(ctx.store.read_section(split, part, step.sequence_set))
    scored = scoring.score_sequences(model, seqs, prompts, batch_tokens=ctx.config.batch_tokens,
                                     pad_id=ctx.pad_id, on_batch=progress)
    return StepResult(scoring.scored_arrays(scored), sum(map(len, seqs)))


def reference_step(ctx: TeacherContext, step: Step, split: str, part: int, model, progress) -> StepResult:
    """The reference model's log-probs at the teacher's top-K ids of the same rows (ADPA)."""
    if ctx.xtok is not None:  # the reference shares the teacher's tokenizer (precompute.xtok)
        return xtok.reference_step(ctx, step, split, part, model, progress)
    base = ctx.store.read_section(split, part, fmt.SET_GENERATED)
    teacher = ctx.store.read_section(split, part, fmt.SET_GENERATED, fmt.SECTION_TEACHER,
                                     [fmt.ARRAY_TOPK_IDS, fmt.ARRAY_TOPK_COUNT])  # the count: only where K adapts
    teacher_ids = teacher[fmt.ARRAY_TOPK_IDS]
    seqs, prompts = split_sequences(base)
    off = base[fmt.ARRAY_RESPONSE_OFFSETS]
    at = [teacher_ids[off[s]:off[s + 1]] for s in range(len(seqs))]
    scored = scoring.score_sequences(model, seqs, prompts, at_ids=at, batch_tokens=ctx.config.batch_tokens,
                                     pad_id=ctx.pad_id, on_batch=progress)
    return StepResult(scoring.scored_arrays(scored, at_ids=True, at_counts=teacher.get(fmt.ARRAY_TOPK_COUNT)),
                      sum(map(len, seqs)))


def generate_step(ctx: TeacherContext, step: Step, split: str, part: int, model, progress) -> StepResult:
    """The student's greedy answer to each prompt of the part (ADPA's released recipe)."""
    config = ctx.config
    rows = ctx.rows_of_part(split, part)
    prompts = _generation_prompts(ctx, rows)
    engine = engines.as_engine(model, pad_id=ctx.pad_id, batch_size=config.generation_batch)
    answers = engine.greedy(prompts, max_new_tokens=config.max_new_tokens, eos_ids=ctx.eot_ids, on_batch=progress)
    seqs = [(r.index, fmt.ROLE_GENERATED, np.concatenate([p, a]).astype(np.int64), len(p))
            for r, p, a in zip(rows, prompts, answers) if len(a) > 0]
    return StepResult(base_arrays(seqs), sum(len(s[2]) for s in seqs), attrs=_engine_attrs(model))


def _engine_attrs(model) -> dict | None:
    """A part's record of the vLLM engine that computed it (every setting); None for transformers."""
    return {"engine": model.settings()} if isinstance(model, engines.VllmEngine) else None


def on_engine(ctx: TeacherContext, step: Step) -> bool:
    """Whether ``step`` runs on a vLLM engine: with --engine vllm, the generation and the teacher's top-K (across
    tokenizers the teacher scores text in its own tokens and spans (:mod:`precompute.xtok`), and with tail samples:
    transformers)."""
    if ctx.config.engine != engines.VLLM:
        return False
    # tail samples are drawn from the full distribution, which the engine does not return: transformers
    return step.run is generate_step or (step.run is topk_step and ctx.xtok is None and not ctx.config.tail_samples)


def _generation_prompts(ctx: TeacherContext, rows: list[Row]) -> list[np.ndarray]:
    """The prompts' token ids as the student answers them: chat template, cut from the left to the budget."""
    config = ctx.config
    budget = max(chat.MIN_PROMPT_TOKENS, config.max_length - config.max_new_tokens)
    return [chat.encode_prompt(ctx.tokenizer, r.prompt, budget) for r in rows]


def _groups(ctx: TeacherContext, split: str, part: int) -> int:
    """Sampled groups in ``part`` (PAD's cost per group)."""
    return int(ctx.store.section_attrs(split, part, fmt.SET_SAMPLES)["rows"].get(fmt.AXIS_GROUP, 0))


STEPS = {step.name: step for step in (
    Step(fmt.PASS_PAIRS_STUDENT_INIT, fmt.SET_PAIRS, fmt.SECTION_STUDENT_INIT, ROLE_STUDENT, sums_step),
    Step(fmt.PASS_SAMPLES_STUDENT_INIT, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT, ROLE_STUDENT, sums_step),
    Step(fmt.PASS_GENERATED_BASE, fmt.SET_GENERATED, fmt.BASE, ROLE_STUDENT, generate_step),
    Step(fmt.PASS_PAIRS_TEACHER, fmt.SET_PAIRS, fmt.SECTION_TEACHER, ROLE_TEACHER, topk_step),
    Step(fmt.PASS_SAMPLES_TEACHER, fmt.SET_SAMPLES, fmt.SECTION_TEACHER, ROLE_TEACHER, topk_step),
    Step(fmt.PASS_SAMPLES_TEACHER_MCQ, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ, ROLE_TEACHER, calibration.mcq_step),
    Step(fmt.PASS_GENERATED_TEACHER, fmt.SET_GENERATED, fmt.SECTION_TEACHER, ROLE_TEACHER, topk_step),
    Step(fmt.PASS_GENERATED_REFERENCE, fmt.SET_GENERATED, fmt.SECTION_REFERENCE, ROLE_REFERENCE, reference_step),
)}
#: what a step reads of the same part besides its set's base: the step that writes it
READS = {fmt.PASS_GENERATED_TEACHER: fmt.PASS_GENERATED_BASE, fmt.PASS_GENERATED_REFERENCE: fmt.PASS_GENERATED_TEACHER}
#: the arrays of another section of the same part a step reads, whose checksums enter its content key
KEY_READS = {fmt.PASS_GENERATED_REFERENCE: (fmt.PASS_GENERATED_TEACHER, (fmt.ARRAY_TOPK_IDS, fmt.ARRAY_TOPK_COUNT,
                                                                        fmt.ARRAY_TEACHER_TOPK_IDS))}


def plan_steps(ctx: TeacherContext) -> list[Step]:
    """The steps ``ctx.config.passes`` need, in the order that loads each model once where it can."""
    passes = ctx.config.passes
    names: list[str] = []
    if PASS_DPO_REF in passes:
        names.append(fmt.PASS_PAIRS_STUDENT_INIT)
        if _has_samples(ctx):  # DPO reference sums for the groups too (pad_dpo)
            names.append(fmt.PASS_SAMPLES_STUDENT_INIT)
    if PASS_ADPA in passes:
        names.append(fmt.PASS_GENERATED_BASE)
    if PASS_PAIRS in passes:
        names.append(fmt.PASS_PAIRS_TEACHER)
    if PASS_PAD in passes or PASS_PAD_LOGP in passes:
        names.append(fmt.PASS_SAMPLES_TEACHER)
    if PASS_PAD in passes or PASS_PAD_MCQ in passes:
        names.append(fmt.PASS_SAMPLES_TEACHER_MCQ)
    if PASS_ADPA in passes:
        names.extend([fmt.PASS_GENERATED_TEACHER, fmt.PASS_GENERATED_REFERENCE])
    return [STEPS[name] for name in names]


def _has_samples(ctx: TeacherContext) -> bool:
    declared = ctx.store.splits()
    return bool(ctx.rows) and all(split in declared for split in ctx.rows) and all(
        ctx.store.is_complete(split, part, fmt.SET_SAMPLES)
        for split in ctx.rows for part in range(ctx.store.num_parts(split)))


def step_record(ctx: TeacherContext, step: Step) -> PassRecord:
    """What ``step``'s numbers depend on: its model and every setting that changes them."""
    info = ctx.models[step.model_role]
    settings: dict = {"dtype": ctx.dtype, "max_length": ctx.config.max_length}
    if step.section == fmt.SECTION_TEACHER:
        settings["top_k"] = ctx.top_k_of(step)
        if ctx.config.top_p < 1:  # absent: 1.0, every row keeps K (the records of fixed-K passes stay as they were)
            settings["top_p"] = ctx.config.top_p
        if tail_samples_of(ctx, step):  # absent: none (the records of passes without samples stay as they were)
            settings["tail_samples"] = tail_samples_of(ctx, step)
            settings["tail_seed"] = ctx.config.tail_seed
    if step.section == fmt.SECTION_REFERENCE:
        settings["reference_is"] = ("the student's initial model" if not ctx.config.reference
                                    else "given (--reference)")
        settings["at_ids_of"] = "generated/teacher topk_ids"
    if step.section == fmt.SECTION_TEACHER_MCQ:
        settings.update(ctx.mcq.provenance())
    if step.sequence_set == fmt.SET_GENERATED and step.section == fmt.BASE:
        settings.update({"decoding": "greedy", "responses_per_prompt": 1,
                         "max_new_tokens": ctx.config.max_new_tokens})
    if on_engine(ctx, step):  # absent: transformers, as before engines existed (existing keys stay valid)
        spec = engines.EngineSpec.of(ctx.config)
        settings["engine"] = spec.record(tail=engines.TAIL_RULE) if step.run is topk_step else spec.record()
    if ctx.xtok is not None and step.model_role in (ROLE_TEACHER, ROLE_REFERENCE):
        settings[fmt.ATTR_CROSS_TOKENIZER] = ctx.xtok.provenance()
    return PassRecord(ModelRecord(info.name, info.weights_hash), settings)


# --------------------------------------------------------------------------- content keys (store.keys)

def content_key(ctx: TeacherContext, step: Step, split: str, part: int) -> str | None:
    """The content key of ``step``'s section of one part: from the step's pass record (weights' sha256 and
    settings), the store's checksums of what it is computed on and, where the step reads them, the rows; no
    model loads. None while a section it is computed on is not complete."""
    store, record = ctx.store, step_record(ctx, step)
    where = {"layout": store.key_layout(), "example_range": store.part_range(split, part),
             "model_sha256": record.model.sha256 if record.model else None, "settings": record.settings}
    if step.section == fmt.BASE:  # generated/base: the student's answers to the part's prompts
        rows = ctx.rows_of_part(split, part)
        return keys.generated_base_key(**where, eot_ids=ctx.eot_ids,
                                       prompt_ids=[(r.index, p) for r, p in zip(rows, _generation_prompts(ctx, rows))])
    base = store.section_attrs(split, part, step.sequence_set)
    if not (base and base.get("complete")):
        return None
    reads = {}
    if step.name in KEY_READS:
        other, names = KEY_READS[step.name]
        attrs = store.section_attrs(split, part, *other.split("/"))
        if not (attrs and attrs.get("complete")):
            return None
        reads[other] = {n: attrs["checksums"][n] for n in names if n in attrs["checksums"]}
    prompts = (prompts_fingerprint(ctx.rows_of_part(split, part, prompts=True))
               if step.section == fmt.SECTION_TEACHER_MCQ else None)  # the question is the row's text
    seed = tail_part_seed(ctx, split, part) if tail_samples_of(ctx, step) else None  # the draws of this part
    return keys.section_key(step.name, **where, base_checksums=base["checksums"], reads=reads,
                            prompts_sha256=prompts, part_seed=seed)


def pairs_base_key(ctx: TeacherContext, split: str, part: int) -> str:
    """The content key of one part's pairs base: tokenizer, encode settings and the part's rows."""
    return keys.pairs_base_key(layout=ctx.store.key_layout(), example_range=ctx.store.part_range(split, part),
                               encode=ctx.store.pass_record(PASS_ENCODE).settings,
                               rows=[r.to_json() for r in ctx.rows_of_part(split, part)])


def _with_key(result: StepResult, key: str | None) -> StepResult:
    return dataclasses.replace(result, attrs={**(result.attrs or {}), keys.ATTR: key})


def _reuse_parts(ctx: TeacherContext, step: Step, todo: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The parts of ``todo`` that no store of ``--reuse-from`` holds; the others are copied in (verified), the
    step's settings recorded first."""
    if not ctx.reuse:
        return todo

    def record() -> None:
        ctx.store.register_pass(step.name, step_record(ctx, step).to_dict(), may_replace=True)

    return ctx.reuse.take_parts(step.name, step.sequence_set, step.section, todo,
                                lambda split, part: content_key(ctx, step, split, part), before=record)


# --------------------------------------------------------------------------- set-up

def prepare(config: TeacherConfig, summary: Summary) -> TeacherContext:
    """Rows, models, tokenizers and the store: everything cheap and checkable, before any model runs."""
    unknown = set(config.passes) - set(KNOWN_PASSES)
    if unknown:
        raise ValueError(f"unknown pass(es) {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_PASSES)}")
    engines.EngineSpec.of(config).check(config.device_map)
    device = models.resolve_device(config.device)
    dtype = str(models.resolve_dtype(config.dtype, device)).replace("torch.", "")
    engines.note_suggestion(config.engine, device)
    needs_pairs = any(p in config.passes for p in NEEDS_PAIRS)
    pad, mcq = _pad_passes(config.passes)
    prompt_rows: dict[str, LoadedSplit] = {}
    mcq_template = samples_record = None
    if pad:
        make = (f"`precompute sample --out {config.out} --dataset {config.dataset or 'demo'}"
                f"{' --limit ' + str(config.limit) if config.limit else ''} --split {','.join(config.splits)}` "
                f"(the pad pass scores the groups it writes)")
        samples_store = require_samples(config.out, config.splits, config.storage_options, make=make)
        samples_record = samples_store.pass_record(fmt.PASS_SAMPLES_BASE) or PassRecord()
        if mcq:
            mcq_template = calibration.load_template(config.mcq_template)
        # the MCQ question is the row's text: prompt-only rows are fine for pad
        prompt_rows = load_data(config, require_pairs=False)
        check_samples_match(samples_store, prompt_rows, config.out)
    rows = load_data(config) if needs_pairs else prompt_rows

    infos = {ROLE_TEACHER: models.resolve_model(config.teacher, models.EMBEDDED_TEACHER)}
    if PASS_DPO_REF in config.passes or PASS_ADPA in config.passes:
        infos[ROLE_STUDENT] = models.resolve_model(config.student, models.EMBEDDED_STUDENT)
    if PASS_ADPA in config.passes:
        infos[ROLE_REFERENCE] = (models.resolve_model(config.reference, models.EMBEDDED_STUDENT) if config.reference
                                 else infos[ROLE_STUDENT])
    tokenizer = models.load_tokenizer(infos[ROLE_TEACHER].path)
    samples = [(r.prompt, r.chosen) for split in rows.values() for r in split.rows[:8] if r.chosen is not None]
    cross, store_model = (_cross_tokenizer(config, infos, tokenizer, samples) if config.cross_tokenizer
                          else (None, infos[ROLE_TEACHER]))
    for role, info in infos.items():
        if role != ROLE_TEACHER and (cross is None or role == ROLE_REFERENCE):
            _same_tokenization(tokenizer, models.load_tokenizer(info.path), samples or chat.DEFAULT_SAMPLES,
                               (f"teacher {infos[ROLE_TEACHER].name}", f"{role} {info.name}"), config, role)

    vocab = vocab_size_of(infos[ROLE_TEACHER], tokenizer)
    if config.top_k > vocab and any(p in config.passes for p in READS_TOP_K):
        raise ValueError(f"--top-k {config.top_k}: the teacher {infos[ROLE_TEACHER].name} has {vocab} tokens; "
                         f"use --top-k {vocab} or less")
    if config.top_p < 1 and config.top_k > np.iinfo(np.uint16).max:  # the store's topk_count is uint16
        raise ValueError(f"--top-p {config.top_p} with --top-k {config.top_k}: an adaptive K is capped at 65535")
    _check_tail_samples(config)

    teacher_tokenizer, tokenizer = tokenizer, (cross.student if cross else tokenizer)  # the store's: of its ids
    try:
        store = open_store(config.out, model=store_model, tokenizer=tokenizer, dataset=config.dataset,
                           max_length=config.max_length, examples_per_part=config.examples_per_part,
                           storage_options=config.storage_options)
    except TokenizerMismatchError as exc:
        raise TokenizerMismatchError(f"{exc}{_CROSS_HINT if not config.cross_tokenizer else ''}") from exc
    eot_ids = cross.student_end_ids if cross else _end_of_turn_ids(tokenizer, infos)
    ctx = TeacherContext(config=config, store=store, tokenizer=tokenizer, models=infos, rows=rows, device=device,
                         dtype=dtype, eot_ids=eot_ids, pad_id=chat.pad_id(tokenizer),
                         prompt_rows=prompt_rows, vocab=vocab, xtok=cross)
    if cross is not None:
        cross.keep_in(store)
    if mcq:
        ctx.mcq = calibration.McqSetup.build(teacher_tokenizer, mcq_template, samples_record, config)
    for split, loaded in rows.items():
        summary.examples[split] = len(loaded.rows)
        summary.skipped[split] = dict(loaded.skipped)
        if not needs_pairs:  # pad only: the split's dataset record describes pairs, leave it
            store.set_split(split, loaded.total_rows)
    if pad:
        record_sample_counts(store, list(rows))  # set_split above resets the split's record
    _refuse_conflicting_passes(ctx)
    if mcq:
        _check_calibration_answerable(ctx)
    ctx.reuse = Reuse.for_run(store, config, summary)
    return ctx


#: what a refusal for two tokenizers adds when --cross-tokenizer was not given
_CROSS_HINT = (". To distil across tokenizers (the teacher scores each response's text in its own template and "
               "tokens; the store keeps the student's ids), add --cross-tokenizer")


def _same_tokenization(teacher, other, samples, names, config: TeacherConfig, role: str) -> None:
    """:func:`lm.chat.check_same_tokenization`, whose refusal says how to run across tokenizers where that applies."""
    try:
        chat.check_same_tokenization(teacher, other, samples, names=names)
    except chat.TokenizerMismatch as exc:
        if role == ROLE_REFERENCE and config.cross_tokenizer:
            raise chat.TokenizerMismatch(f"{exc}. Across tokenizers ADPA's reference is read at the teacher's "
                                         f"top-K ids: give --reference a model with the teacher's tokenizer (e.g. "
                                         f"the teacher's SFT checkpoint)") from exc
        raise chat.TokenizerMismatch(f"{exc}{'' if config.cross_tokenizer else _CROSS_HINT}") from exc


def _cross_tokenizer(config: TeacherConfig, infos: dict[str, models.ModelInfo], teacher_tokenizer,
                     samples) -> tuple[CrossTokenizer | None, models.ModelInfo]:
    """``--cross-tokenizer``: (the run's two tokenizers, or None where the student's is the teacher's; the model
    whose tokenizer writes the store's ids). The student's tokenizer is the store's (a store that exists keeps its
    own: ``--student`` must have it); ADPA's reference must have the teacher's (``--reference``, no default)."""
    existing = TeacherStore(config.out, mode="r", storage_options=config.storage_options)
    recorded = existing.tokenizer if existing.exists() else None
    try:
        student = infos.get(ROLE_STUDENT) or xtok.student_model_info(config, recorded.name if recorded else None)
    except models.ModelNotFoundError as exc:
        raise ValueError(f"--cross-tokenizer: {exc}; pass --student, the model whose tokenizer wrote "
                         f"{config.out}'s token ids") from exc
    student_tokenizer = models.load_tokenizer(student.path)
    teacher = infos[ROLE_TEACHER]
    student_hash = chat.tokenizer_hash(student_tokenizer)
    if recorded is not None and recorded.hash != student_hash:
        raise TokenizerMismatchError(
            f"{config.out}: its token ids are tokenizer {recorded.name!r}'s (hash {recorded.hash}); the student "
            f"{student.name} has tokenizer hash {student_hash}, the teacher {teacher.name} "
            f"{chat.tokenizer_hash(teacher_tokenizer)}: pass --student the model whose tokenizer wrote the store")
    if student_hash == chat.tokenizer_hash(teacher_tokenizer):
        return None, teacher
    if ROLE_REFERENCE in infos and not config.reference:
        raise ValueError(f"--passes {PASS_ADPA} --cross-tokenizer: ADPA's reference is read at the teacher's top-K "
                         f"ids, so it needs the teacher's tokenizer: give --reference (e.g. the teacher's SFT "
                         f"checkpoint); the default, the student's initial model {student.name}, has another")
    student_info = infos.get(ROLE_STUDENT, student)
    cross = CrossTokenizer.build(
        teacher_tokenizer, student_tokenizer, teacher_name=teacher.name, student_name=student.name,
        teacher_size=vocab_size_of(teacher, teacher_tokenizer),
        teacher_end_ids=chat.end_of_turn_ids(teacher_tokenizer, models.generation_eos_ids(teacher.path)),
        student_end_ids=chat.end_of_turn_ids(student_tokenizer, models.generation_eos_ids(student_info.path)))
    return cross, student


def _check_tail_samples(config: TeacherConfig) -> None:
    """Before any model loads: a top-K of 0 (a pure sampled store) needs tail samples, an adaptive K needs a
    top-K, and ADPA, whose advantage lives at the teacher's top-K ids, needs one."""
    if config.top_k > 0:
        return
    if not config.tail_samples:
        raise ValueError("--top-k 0 keeps no teacher log-prob: give --tail-samples S (a pure sampled store, e.g. "
                         "--top-k 0 --tail-samples 12) or a --top-k of 1 or more")
    if config.top_p < 1:
        raise ValueError(f"--top-p {config.top_p} with --top-k 0: an adaptive K chooses among the top-K; "
                         f"drop --top-p or give a --top-k")
    if PASS_ADPA in config.passes:
        raise ValueError(f"--top-k 0 with --passes {','.join(config.passes)}: ADPA's advantage is taken at the "
                         f"teacher's top-K ids, which --top-k 0 does not keep; leave {PASS_ADPA} out (--passes "
                         f"{PASS_PAIRS},{PASS_DPO_REF}) or give a --top-k")


def _pad_passes(passes) -> tuple[bool, bool]:
    """(whether ``passes`` read the sampled groups, whether they include PAD's calibration)."""
    return (any(p in passes for p in PAD_PASSES), PASS_PAD in passes or PASS_PAD_MCQ in passes)


def _check_calibration_answerable(ctx: TeacherContext) -> None:
    """Before any model loads: a calibration still to compute needs a teacher token for each answer letter."""
    todo = any(not ctx.store.is_complete(split, part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
               for split in ctx.rows for part in range(ctx.store.num_parts(split)))
    if not todo:
        return
    try:
        ctx.mcq.letter_ids  # decodes the vocabulary once; the step reuses it
    except ValueError as exc:
        asked = PASS_PAD_MCQ if PASS_PAD not in ctx.config.passes else f"{PASS_PAD} (which includes {PASS_PAD_MCQ})"
        raise ValueError(f"--passes {asked}: PAD's calibration asks the teacher {ctx.models[ROLE_TEACHER].name} a "
                         f"multiple-choice question, but {exc}. Leave the calibration out: --passes "
                         f"{PASS_PAD_LOGP} writes the teacher's log-prob sums alone, which train student --method "
                         f"pad --pad-alpha 1 reads") from exc


def _refuse_conflicting_passes(ctx: TeacherContext) -> None:
    """Before any model loads: a step the store holds with other settings is refused where parts of it exist.

    A step recorded but never written (its model failed to load, say) is not a
    conflict: :func:`run_steps` records the settings that actually run.
    """
    for step in plan_steps(ctx):
        diff = ctx.store.pass_conflict(step.name, step_record(ctx, step).to_dict())
        written = diff and any(ctx.store.complete_parts(split, step.sequence_set, step.section)
                               for split in ctx.rows if split in ctx.store.splits())
        if written:
            raise ProvenanceMismatch(f"{ctx.store.location}: pass {step.name!r} is already in this store with "
                                     f"other settings: {diff}. Write to another --out, or delete the store")


def _end_of_turn_ids(tokenizer, infos: dict[str, models.ModelInfo]) -> list[int]:
    """The ids that end an answer of the model that generates (the student), its generation config included."""
    generator = infos.get(ROLE_STUDENT, infos[ROLE_TEACHER])
    return chat.end_of_turn_ids(tokenizer, models.generation_eos_ids(generator.path))


def write_pair_bases(ctx: TeacherContext, summary: Summary) -> None:
    """Tokenise chosen and rejected, record each split's rows, write the parts not yet there.

    Cheap, and every later step of the pairs set reads them.
    """
    config = ctx.config
    for split, loaded in ctx.rows.items():
        truncated = {"prompt": 0, "response": 0}
        per = config.examples_per_part
        seqs_of_part: list[list] = [[] for _ in range((loaded.total_rows + per - 1) // per)]
        for r in loaded.rows:  # rows come in index order, so each part's sequences do too
            for role, text in ((fmt.ROLE_CHOSEN, r.chosen), (fmt.ROLE_REJECTED, r.rejected)):
                enc = chat.encode_example(ctx.tokenizer, r.prompt, text, config.max_length)
                truncated["prompt"] += enc.prompt_truncated
                truncated["response"] += enc.response_truncated
                seqs_of_part[r.index // per].append((r.index, role, enc.input_ids, enc.prompt_length))
        summary.truncated[split] = truncated
        ctx.store.set_split(split, loaded.total_rows, dataset={
            **dataset_identity(config.dataset), "fingerprint": loaded.fingerprint,
            "rows_used": len(loaded.rows), "skipped": dict(loaded.skipped), "truncated": truncated,
        })
        for part, seqs in enumerate(seqs_of_part):
            if not ctx.store.is_complete(split, part, fmt.SET_PAIRS):
                key = pairs_base_key(ctx, split, part)
                if not (ctx.reuse and ctx.reuse.take(fmt.PASS_PAIRS_BASE, SectionRef(split, part, fmt.SET_PAIRS), key)):
                    ctx.store.write_section(split, part, fmt.SET_PAIRS, fmt.BASE, base_arrays(seqs), {keys.ATTR: key})


# --------------------------------------------------------------------------- running

class _BackgroundWriter:
    """Writes one part's section while the model computes the next (one write in flight at a time)."""

    def __init__(self, store: TeacherStore):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._pending: Future | None = None

    def write(self, split, part, step: Step, result: StepResult) -> None:
        self.flush()
        self._pending = self._pool.submit(self.store.write_section, split, part, step.sequence_set, step.section,
                                          result.arrays, result.attrs)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def run_steps(ctx: TeacherContext, steps: list[Step], summary: Summary) -> dict[str, int]:
    """Run each step over the parts whose section is not complete; returns groups covered per step.

    A step's settings are recorded once its model has loaded and passed its check,
    just before its first part is computed: the store records only what ran. The
    model (or vLLM engine) is released when the run ends, however it ends.
    """
    writer = _BackgroundWriter(ctx.store)
    groups_done: dict[str, int] = {}
    model = loaded = None
    try:
        for step in steps:
            todo = [(split, part) for split in ctx.rows for part in range(ctx.store.num_parts(split))
                    if not ctx.store.is_complete(split, part, step.sequence_set, step.section)]
            record = summary.step_record(step.name, sum(ctx.store.num_parts(s) for s in ctx.rows) - len(todo))
            todo = _reuse_parts(ctx, step, todo)
            if not todo:
                continue
            info = ctx.models[step.model_role]
            wanted = (info.path, _engine_limits(ctx, step))
            if wanted != loaded:  # the reference is often the student: same weights, no reload
                engines.release(model)  # unload before the next model loads
                model = loaded = None
                models.free_memory()
                model = _load_model(ctx, info, step)
                loaded = wanted
                if step.section != fmt.BASE and not on_engine(ctx, step):
                    _check_model(ctx, model, todo[0], step.model_role)
            ctx.store.register_pass(step.name, step_record(ctx, step).to_dict(), may_replace=True)
            total = sum(_part_tokens(ctx, s, p, step.sequence_set) for s, p in todo) or None
            t0 = time.perf_counter()
            with tqdm(total=total, desc=step.name, unit="tok", unit_scale=True, disable=not ctx.config.progress,
                      dynamic_ncols=True) as bar:
                for split, part in todo:
                    if ctx.store.is_complete(split, part, step.sequence_set, step.section):
                        record["parts_skipped"] += 1  # another writer of this store finished it meanwhile
                        continue
                    result = step.run(ctx, step, split, part, model, bar.update)
                    writer.write(split, part, step, _with_key(result, content_key(ctx, step, split, part)))
                    record["parts_done"] += 1
                    record["tokens"] += result.tokens
                    groups_done[step.name] = groups_done.get(step.name, 0) + result.groups
                writer.flush()
            record["seconds"] = time.perf_counter() - t0
    finally:
        engines.release(model)  # a vLLM engine's processes end here
        model = None
        models.free_memory()
    return groups_done


def _engine_limits(ctx: TeacherContext, step: Step) -> tuple[int, int] | None:
    """(max_model_len, max_logprobs) of the vLLM engine ``step`` runs on; None: it runs on transformers."""
    if not on_engine(ctx, step):
        return None
    return ctx.config.sequence_length(), ctx.config.top_k if step.run is topk_step else 0


def _load_model(ctx: TeacherContext, info: models.ModelInfo, step: Step):
    limits = _engine_limits(ctx, step)
    if limits is not None:
        config = ctx.config
        return engines.VllmEngine(models.model_dir(info), device=ctx.device, dtype=ctx.dtype,
                                  tensor_parallel=config.tensor_parallel, kv_cache_gib=config.kv_cache_gib,
                                  max_model_len=limits[0], max_logprobs=limits[1])
    if ctx.config.device_map:  # sharded by accelerate over this process's GPUs
        from .cluster import load_model

        return load_model(info, device=ctx.device, dtype=ctx.dtype, device_map=ctx.config.device_map)
    model, _, _ = models.load_model(info.path, device=ctx.device, dtype=ctx.dtype)
    return model


def _part_tokens(ctx: TeacherContext, split: str, part: int, sequence_set: str) -> int:
    attrs = ctx.store.section_attrs(split, part, sequence_set)
    return int(attrs["rows"]["token"]) if attrs and attrs.get("complete") else 0


def _check_model(ctx: TeacherContext, model, where: tuple[str, int], role: str | None = None) -> None:
    """Prove on the first sequence of the first part that the decoder/output-layer split is exact."""
    split, part = where
    for sequence_set in (fmt.SET_PAIRS, fmt.SET_GENERATED, fmt.SET_SAMPLES):
        if ctx.store.is_complete(split, part, sequence_set):
            if ctx.xtok is not None and role in (ROLE_TEACHER, ROLE_REFERENCE):  # its own tokens of the text
                xtok.check_model(ctx, model, split, part, sequence_set)
                return
            seqs, prompts = split_sequences(ctx.store.read_section(split, part, sequence_set))
            if seqs:
                check_split(model, seqs[0], prompts[0])
            return


# --------------------------------------------------------------------------- on a cluster (--cluster)

def run_steps_on_cluster(session, ctx: TeacherContext, steps: list[Step], summary: Summary) -> dict[str, int]:
    """:func:`run_steps` with every part of every step a unit of work on ``session``'s workers.

    Each step's settings are recorded once, here, before its parts are
    submitted (the workers load the models; a model that then fails to load
    leaves a record without parts, which :func:`_refuse_conflicting_passes`
    does not hold against a later run). A part of a step that reads another
    step's section of the same part (:data:`READS`) waits for that unit only.
    See :mod:`precompute.cluster`.
    """
    from . import cluster

    fingerprint = session.install(attach_context, portable_context(ctx))
    units: list = []
    records: dict[str, dict] = {}
    for index, step in enumerate(steps):
        todo = [(split, part) for split in ctx.rows for part in range(ctx.store.num_parts(split))
                if not ctx.store.is_complete(split, part, step.sequence_set, step.section)]
        records[step.name] = summary.step_record(step.name,
                                                 sum(ctx.store.num_parts(s) for s in ctx.rows) - len(todo))
        if not todo:
            continue
        ctx.store.register_pass(step.name, step_record(ctx, step).to_dict(), may_replace=True)
        for split, part in _reuse_parts(ctx, step, todo):  # reused here, not submitted
            after = ((READS[step.name], split, part),) if step.name in READS else ()
            units.append(cluster.Unit(step.name, split, part, compute_part,
                                      (fingerprint, step.name, split, part, _rows_for(ctx, step, split, part)),
                                      after=after, priority=len(steps) - index))
    results = session.run(units, desc="teacher parts", progress=ctx.config.progress)
    return cluster.tally(results, records)


def portable_context(ctx: TeacherContext) -> TeacherContext:
    """What the workers get once per run: the context without its store handle, rows and reuse (whose
    locations and options may hold credentials: the coordinator alone reuses)."""
    config = dataclasses.replace(ctx.config, reuse_from=(), reuse_options={})
    return dataclasses.replace(ctx, config=config, store=None, rows={}, prompt_rows={}, reuse=None)


def attach_context(portable: TeacherContext) -> TeacherContext:
    """On a worker: the portable context with the store opened there (same location)."""
    config = portable.config
    store = TeacherStore.open(config.out, mode="a", storage_options=config.storage_options)
    return dataclasses.replace(portable, store=store)


def _rows_for(ctx: TeacherContext, step: Step, split: str, part: int) -> LoadedSplit | None:
    """The rows a step reads, of this part only (most steps read the store alone)."""
    if step.run is generate_step:
        rows = ctx.rows_of_part(split, part)
    elif step.run is calibration.mcq_step or (ctx.xtok is not None and step.model_role != ROLE_STUDENT):
        rows = ctx.rows_of_part(split, part, prompts=step.sequence_set == fmt.SET_SAMPLES)  # prompts read as text
    else:
        return None
    return LoadedSplit(split, rows, {}, len(rows), "")


def compute_part(fingerprint: str, step_name: str, split: str, part: int, rows: LoadedSplit | None,
                 *_after) -> dict:
    """On a worker: one step over one part, written into the store (a unit of :func:`run_steps_on_cluster`)."""
    from . import cluster

    ctx = cluster.worker_context(fingerprint)
    step = STEPS[step_name]
    with cluster.part_task(step_name, split, part) as outcome:
        if ctx.store.is_complete(split, part, step.sequence_set, step.section):
            return outcome  # done before, or by a worker that died after writing it
        if rows is not None:
            ctx = dataclasses.replace(ctx, rows={split: rows}, prompt_rows={split: rows})
        where = (split, part)
        limits = _engine_limits(ctx, step)
        if limits is not None:
            model = cluster.worker_engine(ctx.models[step.model_role], device=ctx.device, dtype=ctx.dtype,
                                          spec=engines.EngineSpec.of(ctx.config), max_model_len=limits[0],
                                          max_logprobs=limits[1])
        else:
            check = None if step.section == fmt.BASE else (lambda model: _check_model(ctx, model, where,
                                                                                       step.model_role))
            model = cluster.worker_model(ctx.models[step.model_role], device=ctx.device, dtype=ctx.dtype,
                                         device_map=ctx.config.device_map, on_load=check)
        result = _with_key(step.run(ctx, step, split, part, model, lambda n: None),
                           content_key(ctx, step, split, part))
        written = ctx.store.write_section(split, part, step.sequence_set, step.section, result.arrays,
                                          result.attrs)
        outcome.update(computed=True, written=written is not None, tokens=result.tokens, groups=result.groups)
    return outcome


def _run_on_cluster(config: TeacherConfig, summary: Summary) -> tuple[TeacherContext, dict[str, int]]:
    from .cluster import ClusterSession

    with ClusterSession(config.cluster, engine=engines.EngineSpec.of(config)) as session:
        device, dtype = session.resolve(config.device, config.dtype)
        ctx = prepare(dataclasses.replace(config, device=device, dtype=dtype), summary)
        if any(p in config.passes for p in NEEDS_PAIRS):
            write_pair_bases(ctx, summary)
        groups_done = run_steps_on_cluster(session, ctx, plan_steps(ctx), summary)
        summary.notes.append(f"  cluster {config.cluster}: {session.workers} worker(s)")
    return ctx, groups_done


def run_teacher(config: TeacherConfig) -> Summary:
    t0 = time.perf_counter()
    summary = Summary(store=config.out)
    if config.cluster:
        ctx, groups_done = _run_on_cluster(config, summary)
    else:
        ctx = prepare(config, summary)
        if any(p in config.passes for p in NEEDS_PAIRS):
            write_pair_bases(ctx, summary)
        groups_done = run_steps(ctx, plan_steps(ctx), summary)
    summary.seconds = time.perf_counter() - t0
    if _pad_passes(config.passes)[0]:
        summary.notes.extend(calibration.summary_lines(ctx.store, list(ctx.rows), summary, groups_done))
    if ctx.xtok is not None:
        summary.notes.extend(xtok.summary_lines(ctx.store, list(ctx.rows), plan_steps(ctx)))
    elif config.cross_tokenizer:
        summary.notes.append("  --cross-tokenizer: the student's tokenizer is the teacher's; nothing to align")
    return finish_summary(ctx.store, ctx.rows, summary)
