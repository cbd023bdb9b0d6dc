"""``train evaluate``: how close a student is to the teacher, and how it ranks preference pairs and groups.

For any model that :func:`lm.models.resolve_model` accepts (a trained
run's directory, the embedded student, ...), on a split (default ``test``) of the
store's ``pairs`` when it has ``pairs/teacher``:

- ``kl_chosen`` / ``kl_rejected``: held-out token KL(teacher || model), the
  (K+1)-bin tail-bucket KL that KD trains (:func:`train.losses.kd_tail_kl`),
  averaged over every chosen (rejected) response token of the split (of a store
  aligned across tokenizers: over the tokens with an exactly matching teacher
  token whose top-K the vocabulary map keeps some of, the bins in the student's
  vocabulary); on a store
  with tail samples (``--kd-tail``, default ``auto``), their unbiased estimate of
  the full-vocabulary KL instead (:func:`train.losses.kd_sampled_kl`), as KD
  trains there; ``kl_tail`` says which (``bin``, ``samples``);
- ``mean_logp_chosen`` / ``mean_logp_rejected``: the model's mean log-prob per
  response token;
- ``accuracy_logratio``: fraction of pairs the model ranks chosen above rejected
  by its log-ratio to its initial model (DPO's implicit reward):
  ``(log pi(y_w) - log pi_0(y_w)) > (log pi(y_l) - log pi_0(y_l))``. The initial
  sums come from ``--initial`` when given (computed by loading it), else from the
  store's ``pairs/student_init`` section, else from the student the store records;
- ``accuracy_avg_logp``: fraction with a higher length-normalised log-prob of
  the chosen response (SimPO's reward; needs no initial model);
- ``teacher_agreement``: fraction of pairs the model orders as the *teacher*
  does, whatever the dataset's label: the sign of the model's length-normalised
  log-prob margin ``avg log pi(y_w) - avg log pi(y_l)`` equals the sign of the
  teacher's (``pairs/teacher/logp_sum`` over the response length; across
  tokenizers over the teacher's own response tokens, ``teacher_length``). Dataset
  labels are noisy relative to a given teacher; this is the figure that shows a
  preference was distilled. ``teacher_prefers_chosen`` is how often the teacher
  itself ranks the labelled choice first (the ceiling of label accuracy one can
  expect from distillation).

A tie counts half: a margin within ``TIE_NATS`` (log-ratio; the stored initial sums
were computed by another run in float32, so an untrained model differs from them
by rounding only) or exactly zero (length-normalised).

and on the split's sampled groups when it has what PAD's teacher reward reads at
``--pad-alpha`` (``samples/teacher`` for alpha > 0, ``samples/teacher_mcq`` for alpha < 1), the model's ranking of each group by its mean
token log-prob (PAD's student reward; the order does not depend on beta) against
the teacher's, by PAD's teacher reward with the chosen ``pad_alpha``
(:func:`train.methods.teacher_rewards`; Gu et al., "Preference-Aligned Distillation"):

- ``kendall_tau``: mean over groups of Kendall's tau-a,
  ``sum_{i<j} sign(s_i - s_j) sign(t_i - t_j) / (n (n - 1) / 2)`` (a pair tied on
  either side counts 0; 1 = same order, -1 = reversed, 0 = chance);
- ``top1_agreement``: fraction of groups whose model-best response is the
  teacher's best (a tie for the teacher's best counts every tied response as
  best; chance is 1/n);
- ``pad_ppd``: PAD's PPD divergence between the two Plackett-Luce distributions
  over orderings at ``pad_beta`` (:func:`train.losses.pad_loss`), mean over groups;
- ``mean_logp_samples``: the model's mean log-prob per sampled response token.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from lm import chat, engines, models
from store import ExampleStream, Sequence, TeacherStore, check_complete
from store import format as fmt
from store.locations import redact_url

from . import losses, methods
from .batches import collate, token_budget_batches
from .config import EvaluateConfig, TrainError
from .preflight import (check_kd_tail, check_tokenizer, commands_for, first_sequence, load_student, missing_signals,
                        open_store, recorded_student, require_signals, resolve_model, resolve_precision)

TIE_NATS = 1e-3

_PAIR_LOGP = (methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.CHOSEN),
              methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.REJECTED))
_PAIR_KD = (methods.TokenRequest(methods.KD, methods.PAIRS, methods.CHOSEN),
            methods.TokenRequest(methods.KD, methods.PAIRS, methods.REJECTED))
_SAMPLES_LOGP = (methods.TokenRequest(methods.LOGP, methods.SAMPLES, None),)
PAIR_NEEDS = {methods.PAIRS: [methods.TEACHER]}


def group_needs(settings: methods.Settings) -> dict[str, list[str]]:
    """What the group metrics read: the sections PAD's teacher reward reads at ``settings.pad_alpha``."""
    return {methods.SAMPLES: list(methods.pad_reward_sections(settings))}


def kendall_tau(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G] Kendall's tau-a between two scorings [G, n] of each group (module docstring)."""
    n = student.shape[-1]
    agree = (torch.sign(student[:, :, None] - student[:, None, :])
             * torch.sign(teacher[:, :, None] - teacher[:, None, :]))  # [G, n, n]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=student.device), diagonal=1)
    return agree[:, upper].sum(-1) / max(1, n * (n - 1) // 2)


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G] 1.0 where the student's best response [G, n] is (one of) the teacher's best, else 0.0."""
    picked = teacher.gather(-1, student.argmax(-1, keepdim=True)).squeeze(-1)
    return (picked == teacher.max(-1).values).double()


@dataclass
class ModelPass:
    """A loaded model and how it runs over the store's split (:meth:`outputs`)."""

    model: torch.nn.Module
    tokenizer: object
    store: TeacherStore
    config: EvaluateConfig
    device: str
    dtype: torch.dtype

    @classmethod
    def load(cls, path: str, probe: Sequence, store: TeacherStore, config: EvaluateConfig,
             precision: tuple[str, torch.dtype]) -> "ModelPass":
        """The model at ``path``, its split checked on ``probe`` (:func:`train.preflight.load_student`)."""
        model, tokenizer = load_student(path, precision[0], probe)
        return cls(model.eval(), tokenizer, store, config, *precision)

    @torch.no_grad()
    def outputs(self, needs, requests):
        """Yield (batch, outputs) over the split's examples that have every set of ``needs``, in store order."""
        stream = ExampleStream(self.store, self.config.split, needs, shuffle=False)
        for examples in token_budget_batches(stream, self.config.batch_tokens):
            batch = collate(examples, chat.pad_id(self.tokenizer)).to(self.device)
            with methods.autocast_for(self.device, self.dtype):
                outputs = methods.student_outputs(self.model, batch, requests, self.config, self.config.chunk_size)
            yield batch, outputs


def _pair_sums(batch, outputs) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(example indices, logp sums chosen, rejected, token counts chosen, rejected) per pair of a batch."""
    chosen, rejected = methods.pair_sequences(batch)
    sums = methods.pair_logp_sums(batch, outputs).double().cpu()
    counts = torch.bincount(batch.resp_seq, minlength=batch.num_sequences).double().cpu()
    examples = [batch.examples[int(i)].example_index for i in batch.seq_example[chosen].cpu()]
    chosen, rejected = chosen.cpu(), rejected.cpu()
    return examples, sums[chosen], sums[rejected], counts[chosen], counts[rejected]


def evaluate(config: EvaluateConfig) -> dict:
    """The metrics of the module docstring, as a dict of plain numbers and names.

    Pair metrics when the split has ``pairs/teacher``, group metrics when it has what PAD's teacher reward
    reads at ``pad_alpha`` (:func:`group_needs`); refused when it has neither.
    """
    store = open_store(config.cache, config.storage_options)
    if store.num_parts(config.split) == 0:
        require_signals(store, config.split, PAIR_NEEDS, "evaluate")  # names the splits there are
    missing_pairs = missing_signals(store, config.split, PAIR_NEEDS)
    groups = group_needs(config)
    missing_groups = missing_signals(store, config.split, groups)
    has_pairs, has_groups = not missing_pairs, not missing_groups
    if not has_pairs and not has_groups:
        wanted = " and ".join(f"{methods.SAMPLES}/{section}" for section in groups[methods.SAMPLES])
        raise TrainError(f"evaluate needs pairs/teacher (pair metrics) or {wanted} (group rankings at "
                         f"--pad-alpha {config.pad_alpha}) for split {config.split}; {store.location} has neither "
                         f"complete. Compute "
                         f"pairs with: {commands_for(store, missing_pairs)}; or groups with: "
                         f"{commands_for(store, missing_groups)}")
    precision = resolve_precision(config.device, config.dtype)
    if config.engine != engines.HF and not config.generations:
        raise TrainError(f"--engine {config.engine}: only --generations runs on an engine (the metrics are "
                         f"computed with transformers); add --generations FILE or leave --engine out")
    engines.EngineSpec.of(config).check()
    if config.generations:
        engines.note_suggestion(config.engine, precision[0])
    stored_init = not check_complete(store, config.split, {methods.PAIRS: [methods.STUDENT_INIT]})
    recorded = recorded_student(store)
    student = resolve_model(config.model)
    check_tokenizer(store, student)
    initial_info = None
    if has_pairs and (config.initial or not stored_init):
        initial_info = resolve_model(config.initial or (recorded.name if recorded else None))
        check_tokenizer(store, initial_info)
    probe = first_sequence(store, config.split, PAIR_NEEDS if has_pairs else groups)

    init_sums: dict[int, tuple[float, float]] = {}
    if initial_info is not None:  # one forward pass of the initial model, then it is freed
        initial_pass = ModelPass.load(initial_info.path, probe, store, config, precision)
        for batch, outputs in initial_pass.outputs({methods.PAIRS: []}, _PAIR_LOGP):
            for ex, chosen, rejected, _, _ in zip(*_pair_sums(batch, outputs)):
                init_sums[ex] = (float(chosen), float(rejected))
        del initial_pass
        gc.collect()
        initial_from = f"computed with {initial_info.name}"
    else:
        initial_from = "store pairs/student_init" + (f" ({recorded.name})" if recorded else "")

    if has_pairs:
        check_kd_tail(store, config.kd_tail, "evaluate")
    student_pass = ModelPass.load(student.path, probe, store, config, precision)
    result = {"model": student.name, "store": redact_url(store.location), "split": config.split}
    if has_pairs:
        result.update(_pair_metrics(student_pass, init_sums if initial_info is not None else None))
        result["initial"] = initial_from
    if has_groups:
        result.update(_group_metrics(student_pass))
    if config.generations:
        result["generations"] = config.generations
        result["generated_prompts"] = _write_generations(config, student, student_pass, store)
    return result


def _write_generations(config: EvaluateConfig, student, student_pass: ModelPass, store: TeacherStore) -> int:
    """``--generations``: by ``generate()`` on the loaded model, or (``--engine vllm``) by a vLLM engine over
    the model's directory, started once the metrics' model is freed."""
    from .generations import split_prompts, write_generations

    options = dict(samples=config.samples, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                   seed=config.seed)
    if config.engine != engines.VLLM:
        return write_generations(student_pass.model, student_pass.tokenizer, store, config.split, config.generations,
                                 **options)
    prompts = split_prompts(store, config.split)
    tokenizer, device, dtype = student_pass.tokenizer, student_pass.device, student_pass.dtype
    student_pass.model = None
    models.free_memory()
    longest = max((len(p) for _, p in prompts), default=1)
    with engines.VllmEngine(models.model_dir(student), device=device, dtype=str(dtype).replace("torch.", ""),
                            tensor_parallel=config.tensor_parallel, kv_cache_gib=config.kv_cache_gib,
                            max_model_len=longest + config.max_new_tokens) as engine:
        return write_generations(None, tokenizer, store, config.split, config.generations, engine=engine,
                                 prompts=prompts, **options)


def _mean(total, n):
    return total / n if n else math.nan


def _pair_metrics(student: ModelPass, init_sums: dict | None) -> dict:
    """Pair metrics of the module docstring; ``init_sums`` (example -> initial sums) None: the store's."""
    needs = {methods.PAIRS: [methods.TEACHER] + ([methods.STUDENT_INIT] if init_sums is None else [])}
    kl = {"chosen": 0.0, "rejected": 0.0}
    logp = {"chosen": 0.0, "rejected": 0.0}
    tokens = {"chosen": 0, "rejected": 0}
    kl_tokens = {"chosen": 0, "rejected": 0}
    sampled_rows = kd_rows = pairs = 0
    wins_logratio = wins_avg = agree_teacher = teacher_chosen = 0.0
    for batch, outputs in student.outputs(needs, _PAIR_KD):
        sampled_rows += int(outputs.computed[losses.KD_SAMPLED].sum())
        kd_rows += int(outputs.computed[methods.KD].sum())
        for role_name, role in (("chosen", methods.CHOSEN), ("rejected", methods.REJECTED)):
            rows = methods.response_rows(batch, methods.PAIRS, role)
            kl_rows = rows & outputs.computed[methods.KD]  # across tokenizers: the rows with an exact teacher token
            kl[role_name] += float(outputs.kd[kl_rows].double().sum())
            kl_tokens[role_name] += int(kl_rows.sum())
            logp[role_name] += float(outputs.logp[rows].double().sum())
            tokens[role_name] += int(rows.sum())
        examples, sum_c, sum_r, n_c, n_r = _pair_sums(batch, outputs)
        if init_sums is None:
            chosen, rejected = methods.pair_sequences(batch)
            ref = batch.scalars[fmt.signal_name(methods.STUDENT_INIT, fmt.ARRAY_LOGP_SUM)].double().cpu()
            ref_c, ref_r = ref[chosen.cpu()], ref[rejected.cpu()]
        else:
            ref_c = torch.tensor([init_sums[e][0] for e in examples], dtype=torch.float64)
            ref_r = torch.tensor([init_sums[e][1] for e in examples], dtype=torch.float64)
        margin = (sum_c - ref_c) - (sum_r - ref_r)
        wins_logratio += float(torch.where(margin.abs() <= TIE_NATS, 0.5, (margin > 0).double()).sum())
        avg_margin = sum_c / n_c.clamp(min=1) - sum_r / n_r.clamp(min=1)
        wins_avg += float(torch.where(avg_margin == 0, 0.5, (avg_margin > 0).double()).sum())
        chosen, rejected = methods.pair_sequences(batch)
        teacher_sums = batch.scalars[fmt.signal_name(methods.TEACHER, fmt.ARRAY_LOGP_SUM)].double().cpu()
        t_c = methods.teacher_lengths(batch, chosen).cpu().clamp(min=1)  # the teacher's own tokens, across tokenizers
        t_r = methods.teacher_lengths(batch, rejected).cpu().clamp(min=1)
        teacher_margin = teacher_sums[chosen.cpu()] / t_c - teacher_sums[rejected.cpu()] / t_r
        same_sign = torch.sign(avg_margin) == torch.sign(teacher_margin)
        agree_teacher += float(torch.where((avg_margin == 0) | (teacher_margin == 0), 0.5, same_sign.double()).sum())
        teacher_chosen += float((teacher_margin > 0).double().sum())
        pairs += len(examples)
    if pairs == 0:
        raise TrainError(f"{student.store.location}: split {student.config.split!r} has no preference pairs")
    return {
        "pairs": pairs,
        "kl_chosen": _mean(kl["chosen"], kl_tokens["chosen"]),
        "kl_rejected": _mean(kl["rejected"], kl_tokens["rejected"]),
        "kl_tail": (methods.KD_TAIL_BIN if sampled_rows == 0 else methods.KD_TAIL_SAMPLES if sampled_rows == kd_rows
                    else f"{methods.KD_TAIL_SAMPLES} on {sampled_rows} of {kd_rows} tokens"),
        "mean_logp_chosen": _mean(logp["chosen"], tokens["chosen"]),
        "mean_logp_rejected": _mean(logp["rejected"], tokens["rejected"]),
        "accuracy_logratio": wins_logratio / pairs, "accuracy_avg_logp": wins_avg / pairs,
        "teacher_agreement": agree_teacher / pairs, "teacher_prefers_chosen": teacher_chosen / pairs,
        "tokens_chosen": tokens["chosen"], "tokens_rejected": tokens["rejected"],
    }


def _group_metrics(student: ModelPass) -> dict:
    """Group metrics of the module docstring, rewards with the configuration's PAD alpha and beta."""
    settings = student.config
    taus, tops, ppd, sizes = [], [], [], set()
    logp_total, tokens = 0.0, 0
    for batch, outputs in student.outputs(group_needs(settings), _SAMPLES_LOGP):
        rows = methods.response_rows(batch, methods.SAMPLES, None)
        logp_total += float(outputs.logp[rows].double().sum())
        tokens += int(rows.sum())
        for index in methods.sample_groups(batch):
            student = methods.student_rewards(batch, outputs, index, settings).double().cpu()
            teacher = methods.teacher_rewards(batch, index, settings).cpu()
            taus.append(kendall_tau(student, teacher))
            tops.append(top1_agreement(student, teacher))
            ppd.append(losses.pad_loss(student, teacher, kind="ppd", max_group=settings.pad_max_group))
            sizes.add(int(index.shape[1]))
    if not taus:
        raise TrainError(f"{student.store.location}: split {settings.split!r} has no sampled groups")
    return {
        "groups": int(sum(t.numel() for t in taus)), "group_sizes": sorted(sizes),
        "pad_alpha": settings.pad_alpha, "pad_beta": settings.pad_beta,
        "kendall_tau": float(torch.cat(taus).mean()), "top1_agreement": float(torch.cat(tops).mean()),
        "pad_ppd": float(torch.cat(ppd).mean()),
        "mean_logp_samples": _mean(logp_total, tokens), "tokens_samples": tokens,
    }


def format_table(result: dict) -> str:
    """The result as an aligned plain-text table: the pairs' part, then the groups', as present."""
    has_pairs, has_groups = "pairs" in result, "groups" in result
    counts = [f"{result[k]} {k}" for k in ("pairs", "groups") if k in result]
    rows = [("model", result["model"]), ("store", f"{result['store']} (split {result['split']}, {', '.join(counts)})")]
    width = 44
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    if has_pairs:
        lines.extend(_pair_lines(result, width))
    if has_groups:
        lines.extend(_group_lines(result, width))
    if "generations" in result:
        lines.append(f"{'answers written':<{width}}{result['generated_prompts']} prompts -> {result['generations']}")
    return "\n".join(lines)


def _pair_lines(result: dict, width: int) -> list[str]:
    lines = [f"{'initial model sums':<{width}}{result['initial']}"]
    lines.append(f"{'':<{width}}{'chosen':>10}  {'rejected':>10}")
    tail = "tail bucket" if result.get("kl_tail", methods.KD_TAIL_BIN) == methods.KD_TAIL_BIN else "tail sampled"
    lines.append(f"{f'token KL(teacher || model), {tail}':<{width}}{result['kl_chosen']:>10.4f}  "
                 f"{result['kl_rejected']:>10.4f}")
    lines.append(f"{'mean log-prob per token':<{width}}{result['mean_logp_chosen']:>10.4f}  "
                 f"{result['mean_logp_rejected']:>10.4f}")
    lines.append(f"{'response tokens':<{width}}{result['tokens_chosen']:>10d}  {result['tokens_rejected']:>10d}")
    lines.append(f"{'preference accuracy, log-ratio to initial':<{width}}{result['accuracy_logratio']:>10.4f}")
    lines.append(f"{'preference accuracy, mean log-prob':<{width}}{result['accuracy_avg_logp']:>10.4f}")
    lines.append(f"{'agreement with the teacher, mean log-prob':<{width}}{result['teacher_agreement']:>10.4f}  "
                 f"(the teacher prefers the labelled choice in {result['teacher_prefers_chosen']:.4f})")
    return lines


def _group_lines(result: dict, width: int) -> list[str]:
    sizes = result["group_sizes"]
    chance = " / ".join(f"{1 / n:.2f}" for n in sizes)
    return [
        f"{'groups':<{width}}{result['groups']} of {'/'.join(map(str, sizes))} responses; teacher reward "
        f"alpha {result['pad_alpha']:g}, beta {result['pad_beta']:g}",
        f"{'ranking vs teacher: Kendall tau':<{width}}{result['kendall_tau']:>10.4f}  (chance 0)",
        f"{'ranking vs teacher: top-1 agreement':<{width}}{result['top1_agreement']:>10.4f}  (chance {chance})",
        f"{'PAD PPD divergence over orderings':<{width}}{result['pad_ppd']:>10.4f}  (0 = teacher's, max ln 2)",
        f"{'mean log-prob per sampled token':<{width}}{result['mean_logp_samples']:>10.4f}  "
        f"({result['tokens_samples']} tokens)",
    ]
