"""Distillation across tokenizers: a teacher and a student of different families, from the store.

The tokenizers are built with ``tokenizers`` (``tests.tiny``): a byte-level BPE with the ChatML template
(``chatml``) as the teacher, a character-level student with its own template and end token (``charlevel``),
and, for the numbers the student splits and the teacher does not (X-Token's failure), a character-level teacher
whose every two-digit number is one token (``numbers``). The models are tiny random Llamas saved with them.

What is checked: the text alignment of :mod:`lm.xtok` (spans, codes, chunks, the vocabulary map) on cases
worked out by hand; the mapped top-K against a direct merge; the identity for identical tokenizers (exactly
today's arrays and KD); the matched KD term against a direct computation on spans aligned by hand; every method
family computing its store and training; the summary's shares; the refusals.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from click.testing import CliRunner

from lm import chat, models, xtok
from precompute.cli import main as precompute_main
from precompute import xtok as pxtok
from precompute.sample import SampleConfig, run_sample
from precompute.teacher import TeacherConfig, run_teacher
from store import ExampleStream, StoreReader, TeacherStore, TokenizerMismatchError
from store import format as fmt
from store.sequences import split_sequences
from tests import tiny
from train import losses, methods
from train.batches import collate
from train.config import TrainError
from train.trainer import TrainConfig, train

COMMON = dict(device="cpu", dtype="float32", progress=False)


def write_number_pairs(path, n):
    """Rows the character-level families spell, whose answers hold multi-digit numbers: a sum, and a wrong one."""
    rows = []
    for i in range(n):
        a, b = 10 + (i * 7) % 80, 3 + (i * 13) % 90
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}=?"}],
                     "chosen": [{"role": "assistant", "content": f"{a + b} {a} {b}"}],
                     "rejected": [{"role": "assistant", "content": f"{a + b + 11} {b}"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok-models")
    return {
        "teacher": tiny.make_family_model(root / "teacher", "chatml", seed=1, layers=2, hidden=32),
        "reference": tiny.make_family_model(root / "reference", "chatml", seed=3, layers=1, hidden=16),
        "student": tiny.make_family_model(root / "student", "charlevel", seed=2, layers=1, hidden=16),
        "numbers": tiny.make_family_model(root / "numbers", "numbers", seed=4, layers=1, hidden=16),
    }


@pytest.fixture(scope="module")
def number_rows(tmp_path_factory):
    return write_number_pairs(tmp_path_factory.mktemp("xtok-data") / "numbers.jsonl", 12)


@pytest.fixture(scope="module")
def cross_store(tmp_path_factory, family_models, number_rows):
    """pairs, dpo_ref and adpa of the ChatML teacher for the character-level student."""
    out = tmp_path_factory.mktemp("xtok-store") / "cross.zarr"
    summary = run_teacher(TeacherConfig(
        out=str(out), teacher=str(family_models["teacher"]), student=str(family_models["student"]),
        reference=str(family_models["reference"]), dataset=str(number_rows), passes=("pairs", "dpo_ref", "adpa"),
        top_k=6, max_length=64, max_new_tokens=8, examples_per_part=4, cross_tokenizer=True, **COMMON))
    return out, summary


# --------------------------------------------------------------------------- text, spans, alignment

def test_char_spans_tile_the_text_and_a_partial_character_goes_to_the_token_that_completes_it():
    tok = tiny.family_tokenizer("chatml")
    text = "naïve café ✓ 12"
    ids = tok(text, add_special_tokens=False).input_ids
    decoded, spans = xtok.char_spans(tok, ids)
    assert decoded == text
    assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
    assert (spans[1:, 0] == spans[:-1, 1]).all()  # contiguous
    assert "".join(text[a:b] for a, b in spans.tolist()) == text
    pieces = [tok.decode([i]) for i in ids]
    for (a, b), piece in zip(spans.tolist(), pieces):
        if "\ufffd" not in piece:
            assert text[a:b] == piece  # a whole token's span is its own text
    partial = [j for j, piece in enumerate(pieces) if "\ufffd" in piece]
    assert partial and any(spans[j, 0] == spans[j, 1] for j in partial)  # bytes of a character not yet complete


def test_the_response_text_is_stripped_and_the_end_of_turn_is_one_character_past_it():
    tok = tiny.family_tokenizer("inst")  # its template writes a space before the answer
    enc = chat.encode_example(tok, [{"role": "user", "content": "Hi?"}], "Paris.", None)
    response = xtok.response_text(tok, enc.response_ids, chat.end_of_turn_ids(tok))
    assert response.content == "Paris." and response.ended
    assert response.spans[0, 0] < 0  # " Par" holds the stripped space: outside the content, it matches nothing
    assert response.spans[-1].tolist() == [6, 7]
    cut = xtok.response_text(tok, enc.response_ids[:-1], chat.end_of_turn_ids(tok))
    assert not cut.ended and cut.spans.shape[0] == len(enc.response_ids) - 1


@pytest.mark.parametrize("teacher", ["inst", "llama3", "chatml"])
def test_the_teachers_spans_are_moved_onto_the_content(teacher):
    """[INST] writes a space before the answer, Llama-3 trims it: either way the teacher's spans are the content's."""
    student = tiny.family_tokenizer("chatml")
    tok = tiny.family_tokenizer(teacher)
    prompt = [{"role": "user", "content": "Name three colours."}]
    enc = chat.encode_example(student, prompt, "Red, green and blue.", None)
    response = xtok.response_text(student, enc.response_ids, chat.end_of_turn_ids(student))
    example = xtok.teacher_example(tok, prompt, response, None)
    body = example.input_ids[example.prompt_length:]
    assert body[-1] == chat.end_of_turn_id(tok)
    text = response.content
    for (a, b), token in zip(example.spans[:-1].tolist(), body[:-1].tolist()):
        if a >= 0:
            assert text[a:b] == tok.decode([token]).lstrip() or text[a:b] == tok.decode([token])
    assert example.spans[-1].tolist() == [len(text), len(text) + 1]
    alignment = xtok.align(response.spans, example.spans)
    assert alignment.code[-1] == xtok.EXACT  # the two end-of-turn tokens, by role
    assert (alignment.code[1:-1] == xtok.EXACT).all()  # the same BPE merges: every inner token matches


def test_the_format_spells_the_alignment_codes_lm_xtok_computes():
    assert (fmt.ALIGN_EXACT, fmt.ALIGN_STARTS, fmt.ALIGN_NONE) == (xtok.EXACT, xtok.STARTS, xtok.NONE)
    assert fmt.ATTR_CROSS_TOKENIZER in fmt.DESCRIPTION
    described = fmt.DESCRIPTION["arrays"][fmt.SECTION_TEACHER]
    for name in (fmt.ARRAY_ALIGNMENT, fmt.ARRAY_TEACHER_TOPK_IDS, fmt.ARRAY_TEACHER_LENGTH, fmt.ARRAY_TEACHER_SPAN):
        assert name in described
        assert next(s for s in fmt.SECTION_ARRAYS[fmt.SECTION_TEACHER] if s.name == name).optional


def test_alignment_codes_and_chunks_of_spans_worked_out_by_hand():
    # text "12 345" + end: student "1","2"," ","34","5",<end>; teacher "12"," 3","45",<end>
    student = np.array([[0, 1], [1, 2], [2, 3], [3, 5], [5, 6], [6, 7]])
    teacher = np.array([[0, 2], [2, 4], [4, 6], [6, 7]])
    got = xtok.align(student, teacher)
    assert got.code.tolist() == [xtok.STARTS, xtok.NONE, xtok.STARTS, xtok.NONE, xtok.NONE, xtok.EXACT]
    assert got.teacher_row.tolist() == [0, -1, 1, -1, -1, 3]
    assert got.chunk_length.tolist() == [0, 2, 0, 0, 3, 1]  # "12" | " 345" | end
    assert got.chunk_teacher.tolist() == [[0, 0], [0, 1], [0, 0], [0, 0], [1, 3], [3, 4]]
    # a student token outside the text (a stripped space) matches nothing and closes no chunk
    outside = xtok.align(np.array([[-1, 2], [2, 3]]), np.array([[0, 2], [2, 3]]))
    assert outside.code.tolist() == [xtok.NONE, xtok.EXACT] and outside.chunk_length.tolist() == [0, 1]


# --------------------------------------------------------------------------- the vocabulary map

def _metaspace_tokenizer():
    """A SentencePiece-style BPE ('▁' marks a space, decoded by the Metaspace decoder) on the family corpus."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(tiny.FAMILY_CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                         special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_the_map_compares_strings_as_each_tokenizer_decodes_them_in_a_text():
    byte_level = tiny.family_tokenizer("chatml")  # "Ġcapital"
    metaspace = _metaspace_tokenizer()  # "▁capital", which alone decodes to "capital"
    mapping = xtok.vocabulary_map(byte_level, metaspace, teacher_size=len(byte_level),
                                  teacher_end_ids=chat.end_of_turn_ids(byte_level), student_end_id=1)
    spaced = byte_level.convert_tokens_to_ids("Ġcapital")
    assert metaspace.convert_ids_to_tokens(int(mapping[spaced])) == "▁capital"
    assert metaspace.decode([int(mapping[spaced])]) == "capital"  # why raw decoding of a token alone would fail
    bare = byte_level.convert_tokens_to_ids("The")
    assert metaspace.convert_ids_to_tokens(int(mapping[bare])) != "▁The"
    assert mapping[byte_level.convert_tokens_to_ids("<|im_start|>")] == -1  # specials: unmapped
    assert all(mapping[i] == 1 for i in chat.end_of_turn_ids(byte_level))  # end of turn: by role
    partial = [i for i in range(len(byte_level)) if "\ufffd" in byte_level.decode([i])]
    assert partial and (mapping[partial] == -1).all()  # part of a character: no string to compare
    same = xtok.vocabulary_map(byte_level, tiny.family_tokenizer("chatml"), teacher_size=len(byte_level) + 3,
                               teacher_end_ids=[0], student_end_id=2)
    assert same.tolist() == list(range(len(byte_level) + 3))  # identical tokenizers: the identity


def _direct_merge(ids, logp, count, tail, vocab_map):
    """map_top_k for one row, literally: python dicts of probabilities."""
    kept = [(int(i), float(lp)) for k, (i, lp) in enumerate(zip(ids, logp)) if k < count and lp > pxtok.KEPT_ABOVE]
    mass, first = {}, {}
    lost = math.exp(float(tail))
    for position, (i, lp) in enumerate(kept):
        s = int(vocab_map[i])
        if s < 0:
            lost += math.exp(lp)
            continue
        mass[s] = mass.get(s, 0.0) + math.exp(lp)
        first.setdefault(s, position)
    order = sorted(mass, key=lambda s: (-mass[s], first[s]))
    return order, [math.log(mass[s]) for s in order], math.log(lost)


def test_the_mapped_top_k_merges_and_moves_the_unmapped_mass_to_the_tail():
    vocab_map = np.array([3, -1, 3, 0, -1, 5, 2], dtype=np.int32)  # teacher ids 0 and 2 both decode to student 3
    raw_ids = np.array([[0, 1, 2, 5], [4, 1, 6, 0], [6, 0, 0, 0], [5, 6, 3, 2]])
    raw_logp = np.log(np.array([[0.4, 0.3, 0.2, 0.05], [0.5, 0.2, 0.1, 0.1], [0.9, 1e-300, 1e-300, 1e-300],
                                [0.25, 0.25, 0.25, 0.2]])).astype(np.float32)
    raw_logp[2, 1:] = fmt.LOGP_FLOOR  # an adaptive K's padding
    count = np.array([4, 4, 1, 4])
    tail = np.log(1 - np.exp(raw_logp.astype(np.float64)).sum(1).clip(max=1 - 1e-9)).astype(np.float32)
    got = pxtok.map_top_k(raw_ids, raw_logp, count, tail, vocab_map)
    for r in range(4):
        order, logps, lost = _direct_merge(raw_ids[r], raw_logp[r], count[r], tail[r], vocab_map)
        n = len(order)
        assert got.count[r] == n and got.ids[r, :n].tolist() == order
        np.testing.assert_allclose(got.logp[r, :n], logps, rtol=0, atol=1e-6)
        assert (got.logp[r, n:] == fmt.LOGP_FLOOR).all() and (got.ids[r, n:] == 0).all()
        assert got.tail[r] == pytest.approx(lost, abs=1e-6)
    assert got.ids[0, :2].tolist() == [3, 5] and got.logp[0, 0] == pytest.approx(math.log(0.6), abs=1e-6)
    identity = pxtok.map_top_k(raw_ids, raw_logp, count, tail, np.arange(7, dtype=np.int32))
    full = count == 4
    assert np.array_equal(identity.ids[full], raw_ids[full]) and np.array_equal(identity.logp[full], raw_logp[full])
    assert np.array_equal(identity.tail, tail)  # bit for bit
    reference = np.log(np.full((4, 4), 0.1)).astype(np.float32)
    merged = pxtok.merge_at(raw_ids, raw_logp, reference, vocab_map, got.ids, got.count)
    assert merged[0, 0] == pytest.approx(math.log(0.2), abs=1e-6)  # two entries -> one student id: summed


# --------------------------------------------------------------------------- same tokenizer: today's numbers

def test_identical_tokenizers_through_the_text_path_give_exactly_todays_arrays_and_kd(tiny_store, tiny_models,
                                                                                      tiny_dataset):
    """The text path with the identity map, on a store of one tokenizer: the teacher's ids, log-probs, tail, sums
    and KD are today's, bit for bit (and every row is exact)."""
    from precompute import teacher as pt

    teacher_model, _ = tiny_models
    config = TeacherConfig(out=str(tiny_store), teacher=str(teacher_model), dataset=str(tiny_dataset), passes=("pairs",),
                           top_k=8, max_length=96, examples_per_part=4, **COMMON)
    ctx = pt.prepare(config, pt.Summary(store=str(tiny_store)))
    tok = ctx.tokenizer
    ends = chat.end_of_turn_ids(tok)
    ctx_x = pt.dataclasses.replace(ctx, xtok=pxtok.CrossTokenizer.build(
        tok, tok, teacher_name="t", student_name="s", teacher_size=ctx.vocab, teacher_end_ids=ends,
        student_end_ids=ends))
    step = pt.STEPS[fmt.PASS_PAIRS_TEACHER]
    model, _, _ = models.load_model(str(teacher_model), device="cpu", dtype="float32")
    today = pt.topk_step(ctx, step, "train", 0, model, lambda n: None).arrays
    text = pt.topk_step(ctx_x, step, "train", 0, model, lambda n: None).arrays
    assert (text[fmt.ARRAY_ALIGNMENT] == xtok.EXACT).all() and (text[fmt.ARRAY_TOPK_COUNT] == 8).all()
    for name in (fmt.ARRAY_TOPK_IDS, fmt.ARRAY_TOPK_LOGP, fmt.ARRAY_TAIL_LOGP, fmt.ARRAY_TARGET_LOGP, fmt.ARRAY_LOGP_SUM):
        assert np.array_equal(text[name], today[name]), name
    base = ctx.store.read_section("train", 0, fmt.SET_PAIRS)
    assert np.array_equal(text[fmt.ARRAY_TEACHER_LENGTH], base[fmt.ARRAY_RESPONSE_LENGTH])  # PAD's mean: the same
    logits = torch.randn(today[fmt.ARRAY_TOPK_IDS].shape[0], ctx.vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    as_today = losses.kd_tail_kl(logits, torch.from_numpy(today[fmt.ARRAY_TOPK_IDS]),
                                 torch.from_numpy(today[fmt.ARRAY_TOPK_LOGP]), torch.from_numpy(today[fmt.ARRAY_TAIL_LOGP]))
    as_text = losses.kd_tail_kl(logits, torch.from_numpy(text[fmt.ARRAY_TOPK_IDS].astype(np.int64)),
                                torch.from_numpy(text[fmt.ARRAY_TOPK_LOGP]), torch.from_numpy(text[fmt.ARRAY_TAIL_LOGP]),
                                torch.from_numpy(text[fmt.ARRAY_TOPK_COUNT].astype(np.int64)))
    assert torch.equal(as_today, as_text)


def test_identical_tokenizers_with_the_flag_write_todays_store(tmp_path, tiny_models, tiny_dataset, tiny_store):
    teacher, student = tiny_models
    out = tmp_path / "flagged.zarr"
    summary = run_teacher(TeacherConfig(out=str(out), teacher=str(teacher), student=str(student),
                                        dataset=str(tiny_dataset), top_k=8, max_length=96, max_new_tokens=12,
                                        examples_per_part=4, cross_tokenizer=True, **COMMON))
    assert any("nothing to align" in line for line in summary.notes)
    flagged, today = StoreReader.open(str(out)), StoreReader.open(str(tiny_store))
    assert fmt.ATTR_CROSS_TOKENIZER not in flagged.attrs
    assert flagged.attrs["manifest"] == today.attrs["manifest"]  # every section's checksums: the same bytes


# --------------------------------------------------------------------------- the store across tokenizers

def test_the_store_keeps_the_students_ids_records_both_tokenizers_and_the_map(cross_store, family_models):
    out, summary = cross_store
    store = TeacherStore.open(str(out))
    student_tok = models.load_tokenizer(str(family_models["student"]))
    teacher_tok = models.load_tokenizer(str(family_models["teacher"]))
    assert store.tokenizer.hash == chat.tokenizer_hash(student_tok)
    record = store.attrs[fmt.ATTR_CROSS_TOKENIZER]
    assert record["teacher_tokenizer"]["hash"] == chat.tokenizer_hash(teacher_tok)
    assert record["student_tokenizer"]["hash"] == store.tokenizer.hash
    from store.vocab_map import map_sha256, read_vocab_map

    mapping = read_vocab_map(store)
    assert mapping.shape[0] == len(teacher_tok) and map_sha256(mapping) == record["vocab_map"]["sha256"]
    assert store.pass_record(fmt.PASS_PAIRS_TEACHER).settings[fmt.ATTR_CROSS_TOKENIZER]["vocab_map_sha256"] == \
        record["vocab_map"]["sha256"]
    assert store.verify() == []
    from store.inspect import format_info, store_info

    shown = format_info(store_info(store))
    assert f"teacher tok  {record['teacher_tokenizer']['name']}" in shown and "vocabulary map" in shown
    # the summary: the share of exact tokens, what is suppressed, the mass the map keeps
    line = next(line for line in summary.notes if line.strip().startswith("pairs/teacher across tokenizers"))
    assert "with an exactly matching teacher token" in line and "of the teacher's top-K mass" in line
    base = store.read_section("train", 0, fmt.SET_PAIRS)
    teacher = store.read_section("train", 0, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
    rows = base[fmt.ARRAY_RESPONSE_OFFSETS][-1]
    assert teacher[fmt.ARRAY_ALIGNMENT].shape == (rows,) and teacher[fmt.ARRAY_STUDENT_SPAN].shape == (rows, 2)
    assert set(np.unique(teacher[fmt.ARRAY_ALIGNMENT]).tolist()) >= {xtok.EXACT, xtok.STARTS}
    kept = teacher[fmt.ARRAY_TOPK_COUNT]
    assert (teacher[fmt.ARRAY_TOPK_IDS][np.arange(6)[None, :] < kept[:, None]] < len(student_tok)).all()
    # teacher_length: the teacher's own response tokens, the sum over them
    assert (teacher[fmt.ARRAY_TEACHER_LENGTH] == np.diff(teacher[fmt.ARRAY_TEACHER_TOKEN_OFFSETS])).all()


def test_a_damaged_map_is_found_by_verify_and_a_copy_keeps_the_map(cross_store, tmp_path):
    from store.copy import copy_store
    from store.vocab_map import read_vocab_map

    out, _ = cross_store
    copied = tmp_path / "copy.zarr"
    copy_store(str(out), str(copied))
    assert np.array_equal(read_vocab_map(StoreReader.open(str(copied))), read_vocab_map(StoreReader.open(str(out))))
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(out, damaged)
    for chunk in (damaged / fmt.GROUP_VOCAB_MAP / fmt.VOCAB_MAP_TEACHER_TO_STUDENT).rglob("c/*"):
        chunk.unlink()
    problems = TeacherStore.open(str(damaged)).verify()
    assert len(problems) == 1 and fmt.VOCAB_MAP_TEACHER_TO_STUDENT in problems[0]


def test_the_matched_kd_term_equals_a_direct_computation_on_spans_aligned_by_hand(cross_store, family_models):
    """Each student row of one part, aligned here by hand: the texts of single tokens laid end to end (the data is
    ASCII), a student token exact where one teacher token has its span, the teacher's top-K mapped by comparing the
    tokens' strings; KD over those bins (the unmapped mass in the tail, the student's tail outside the mapped
    ids) against the trainer's KD on the same rows."""
    out, _ = cross_store
    store = TeacherStore.open(str(out))
    student_tok = models.load_tokenizer(str(family_models["student"]))
    teacher_tok = models.load_tokenizer(str(family_models["teacher"]))
    t_end = chat.end_of_turn_ids(teacher_tok)
    s_end = chat.end_of_turn_id(student_tok)
    strings = {i: student_tok.decode([i]) for i in range(len(student_tok)) if i not in student_tok.all_special_ids}
    by_string = {v: i for i, v in sorted(strings.items(), reverse=True)}
    terms = methods.resolve_terms("kd")
    stream = list(ExampleStream(store, "train", methods.needs_of(terms), shuffle=False))
    batch = collate(stream[:3], pad_id=chat.pad_id(student_tok))
    batch.response = {k: v.double() if v.is_floating_point() else v for k, v in batch.response.items()}
    model = LlamaForCausalLM.from_pretrained(str(family_models["student"])).double()
    out_ = methods.student_outputs(model, batch, methods.token_requests(terms), methods.Settings())
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows_logits = logits[batch.resp_seq, batch.resp_pos]
    raw_ids = batch.response["teacher/teacher_topk_ids"]
    raw_logp = batch.response["teacher/teacher_topk_logp"]
    checked = 0
    for s in range(batch.num_sequences):
        rows = (batch.resp_seq == s).nonzero().squeeze(1)
        ids = batch.input_ids[s, batch.resp_pos[rows] + 1].tolist()
        # the student's tokens laid end to end, the end of turn one character past the text
        pieces = [student_tok.decode([i]) for i in ids[:-1]] if ids[-1] == s_end else [student_tok.decode([i]) for i in ids]
        text = "".join(pieces).strip()
        lead = len("".join(pieces)) - len("".join(pieces).lstrip())
        spans, at = [], -lead
        for piece in pieces:
            spans.append((at, at + len(piece)))
            at += len(piece)
        if ids[-1] == s_end:
            spans.append((len(text), len(text) + 1))
        t_ids = teacher_tok(text, add_special_tokens=False).input_ids  # the teacher's own tokens of the same text
        t_spans, at = [], 0
        for i in t_ids:
            piece = teacher_tok.decode([i])
            t_spans.append((at, at + len(piece)))
            at += len(piece)
        t_spans.append((len(text), len(text) + 1))
        for j, row in enumerate(rows.tolist()):
            exact = spans[j] in t_spans and spans[j][0] < spans[j][1]
            assert (int(batch.response["teacher/alignment"][row]) == fmt.ALIGN_EXACT) == exact
            if not exact or not bool(out_.computed["kd"][row]):
                continue
            kept = [(int(i), float(lp)) for i, lp in zip(raw_ids[row].tolist(), raw_logp[row].tolist())
                    if lp > fmt.LOGP_FLOOR + 1]
            mass = {}
            for i, lp in kept:  # the teacher's own top-K, each id's string compared with the student's
                sid = s_end if i in t_end else by_string.get(teacher_tok.decode([i]))
                if sid is not None:
                    mass[sid] = mass.get(sid, 0.0) + math.exp(lp)
            count = int(batch.response["teacher/topk_count"][row])
            assert sorted(batch.response["teacher/topk_ids"][row, :count].tolist()) == sorted(mass)
            q = torch.softmax(rows_logits[row], -1)
            p = list(mass.values()) + [max(1.0 - sum(mass.values()), 1e-12)]  # every other teacher id: the tail
            qs = [float(q[sid]) for sid in mass] + [1.0 - float(q[list(mass)].sum())]
            direct = sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, qs) if pj > 0)
            # the stored log-probs are quantised to 1/128 nat (store.format): the bins agree to that
            assert float(out_.kd[row].detach()) == pytest.approx(direct, rel=2e-2, abs=2e-2)
            checked += 1
    assert checked > 5


# --------------------------------------------------------------------------- every method family trains

def _train(store, out, method, **settings):
    run = train(TrainConfig(cache=str(store), out=str(out), method=method, lr=1e-3, batch_tokens=300, max_steps=2,
                            log_every=1, **COMMON, **settings))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    return records


@pytest.mark.parametrize("method", ["kd", "dckd", "adpa", "dckd+adpa"])
def test_token_level_methods_train_on_the_cross_store(cross_store, tmp_path, method):
    out, _ = cross_store
    _train(out, tmp_path / "run", method)


@pytest.mark.parametrize("loss", methods.CROSS_TOKENIZER_LOSSES)
def test_kd_rows_without_an_exact_teacher_token_get_uld_or_the_chunk_likelihood(cross_store, family_models, loss):
    out, _ = cross_store
    store = TeacherStore.open(str(out))
    settings = methods.Settings(cross_tokenizer_loss=loss)
    terms = methods.resolve_terms("kd")
    examples = list(ExampleStream(store, "train", methods.needs_of(terms), shuffle=False))
    batch = collate(examples[:4], pad_id=0)
    model = LlamaForCausalLM.from_pretrained(str(family_models["student"]))
    got = methods.student_outputs(model, batch, methods.token_requests(terms), settings)
    code = batch.response["teacher/alignment"]
    chosen = methods.response_rows(batch, methods.PAIRS, methods.CHOSEN)
    exact = (code == fmt.ALIGN_EXACT) & (batch.response["teacher/topk_count"] > 0)
    assert torch.equal(got.computed["kd"], exact & chosen)
    values = methods.distillation_rows(batch, got, settings)
    if loss == "uld":
        starts = chosen & ~exact & (code != fmt.ALIGN_NONE)
        assert torch.equal(got.computed["uld"], starts) and bool(starts.any())
        assert (values[chosen & (code == fmt.ALIGN_NONE)] == 0).all()  # strict 1-1: nothing where none starts
        probs = torch.where(batch.response["teacher/teacher_topk_logp"] > fmt.LOGP_FLOOR + 1,
                            batch.response["teacher/teacher_topk_logp"].exp(), torch.zeros(()))
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        direct = losses.uld_loss(logits[batch.resp_seq, batch.resp_pos][starts], probs[starts])
        torch.testing.assert_close(got.values["uld"][starts].detach(), direct, rtol=1e-5, atol=1e-6)
    else:
        assert not got.computed["uld"].any() and got.computed["chunk"].any()
        ends = chosen & (batch.response["teacher/chunk_length"] > 0) & ~exact
        assert (values[ends] != 0).all() and (values[chosen & ~exact & ~ends] == 0).all()
        none_rows = chosen & (code == fmt.ALIGN_NONE)
        assert bool(got.computed["chunk"][none_rows].all())  # the rows no teacher token starts at are covered
    token_mean = methods.KD_CHOSEN.loss(batch, got, settings)
    assert float(token_mean.detach()) == pytest.approx(float(values[chosen].sum().detach() / chosen.sum()), rel=1e-6)


def test_pad_and_pad_dpo_on_groups_sampled_by_the_student(tmp_path, family_models, number_rows):
    """``precompute sample`` with the student, then ``--passes pad`` with the other tokenizer's teacher: refused
    without --cross-tokenizer (saying to add it), computed with it (no --student: the store's sampler), trained."""
    out = tmp_path / "pad.zarr"
    run_sample(SampleConfig(out=str(out), model=str(family_models["student"]), dataset=str(number_rows),
                            splits=("train",), n=4, keep=4, max_new_tokens=8, examples_per_part=4, **COMMON))
    teacher = dict(out=str(out), teacher=str(family_models["teacher"]), dataset=str(number_rows), splits=("train",),
                   examples_per_part=4, **COMMON)
    with pytest.raises(TokenizerMismatchError, match="add --cross-tokenizer"):
        run_teacher(TeacherConfig(passes=("pad",), **teacher))
    summary = run_teacher(TeacherConfig(passes=("pad",), cross_tokenizer=True, **teacher))
    assert any(line.strip().startswith("samples/teacher across tokenizers") for line in summary.notes)
    store = TeacherStore.open(str(out))
    section = store.read_section("train", 0, fmt.SET_SAMPLES, fmt.SECTION_TEACHER)
    assert (section[fmt.ARRAY_TEACHER_LENGTH] > 0).any()
    _train(out, tmp_path / "pad", "pad")
    # pad_dpo needs the student's reference sums: the refusal names the command, across tokenizers too
    with pytest.raises(TrainError) as refused:
        _train(out, tmp_path / "pad_dpo", "pad_dpo")
    command = str(refused.value).partition("compute it first with: ")[2].split(" (where ")[0]
    assert "--passes dpo_ref" in command and "--cross-tokenizer" in command
    assert CliRunner().invoke(precompute_main, shlex.split(command)[1:]).exit_code == 0
    _train(out, tmp_path / "pad_dpo", "pad_dpo")


def _scripted_judge(directory):
    """A local judge of another tokenizer (ChatML BPE with the ranking's pieces as tokens) that always answers
    ``[1] > [2] > [3] > [4]``."""
    from transformers import GenerationConfig

    tok = tiny.family_tokenizer("chatml")
    tok.add_tokens(["[1]", " > [2]", " > [3]", " > [4]"])
    end = chat.end_of_turn_id(tok)
    last = int(chat.encode_prompt(tok, [{"role": "user", "content": "rank"}])[-1])
    chain = [last] + tok.convert_tokens_to_ids(["[1]", " > [2]", " > [3]", " > [4]"]) + [end]
    model = tiny.scripted_model(tok, dict(zip(chain, chain[1:])))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    GenerationConfig(eos_token_id=[end], pad_token_id=tok.pad_token_id).save_pretrained(directory)
    return directory


def test_cyclealign_with_a_local_judge_of_another_tokenizer(tmp_path, family_models, number_rows):
    from precompute.rank import RankConfig, run_rank

    out = tmp_path / "round.zarr"
    run_sample(SampleConfig(out=str(out), model=str(family_models["student"]), dataset=str(number_rows),
                            splits=("train",), n=4, keep=4, max_new_tokens=8, examples_per_part=4, **COMMON))
    judge = _scripted_judge(tmp_path / "judge")
    assert chat.tokenizer_hash(models.load_tokenizer(str(judge))) != TeacherStore.open(str(out)).tokenizer.hash
    run_rank(RankConfig(out=str(out), judge=f"local:{judge}", dataset=str(number_rows), splits=("train",),
                        demos=0, **COMMON))
    judged = TeacherStore.open(str(out)).read_section("train", 0, fmt.SET_SAMPLES, fmt.SECTION_JUDGE)
    assert (judged[fmt.ARRAY_JUDGE_RANK] >= 0).all()  # the judge's text was read, whatever its tokenizer
    _train(out, tmp_path / "cyclealign", "cyclealign")


# --------------------------------------------------------------------------- numbers the student splits

def test_numbers_the_student_splits_get_no_token_signal_and_the_share_is_reported(tmp_path, family_models,
                                                                                   number_rows):
    """X-Token's failure: the teacher has one token per two-digit number, the student one per digit. The second
    digit has no teacher token starting at it: the summary reports that share, KD leaves it out, chunks cover it."""
    out = tmp_path / "numbers.zarr"
    summary = run_teacher(TeacherConfig(out=str(out), teacher=str(family_models["numbers"]),
                                        student=str(family_models["student"]), dataset=str(number_rows),
                                        passes=("pairs",), top_k=4, max_length=64, examples_per_part=6,
                                        cross_tokenizer=True, **COMMON))
    store = TeacherStore.open(str(out))
    student_tok = models.load_tokenizer(str(family_models["student"]))
    teacher_tok = models.load_tokenizer(str(family_models["numbers"]))
    counted = {"rows": 0, "none": 0}
    for split in store.splits():
        for part in range(store.num_parts(split)):
            base = store.read_section(split, part, fmt.SET_PAIRS)
            code = store.read_section(split, part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)[fmt.ARRAY_ALIGNMENT]
            seqs, prompt_lengths = split_sequences(base)
            offsets = base[fmt.ARRAY_RESPONSE_OFFSETS]
            for s, (ids, p) in enumerate(zip(seqs, prompt_lengths)):
                text = student_tok.decode(ids[p:-1].tolist())  # one student token per character
                # by hand: the teacher's tokens of the text; the second digit of a two-digit token starts none
                expected = []
                for token in teacher_tok.convert_ids_to_tokens(teacher_tok(text, add_special_tokens=False).input_ids):
                    expected += [fmt.ALIGN_EXACT] if len(token) == 1 else [fmt.ALIGN_STARTS, fmt.ALIGN_NONE]
                got = code[offsets[s]:offsets[s + 1]].tolist()
                assert got == expected + [fmt.ALIGN_EXACT]  # and the end of turn, by role
                counted["rows"] += len(got)
                counted["none"] += sum(1 for c in got if c == fmt.ALIGN_NONE)
    share = 100.0 * counted["none"] / counted["rows"]
    line = next(line for line in summary.notes if line.strip().startswith("pairs/teacher across tokenizers"))
    assert f"{share:.1f}% with no teacher token starting there" in line and counted["none"] > 10
    _train(out, tmp_path / "chunk", "kd", cross_tokenizer_loss="chunk")


# --------------------------------------------------------------------------- refusals

def test_adpa_across_tokenizers_needs_a_reference_with_the_teachers_tokenizer(tmp_path, family_models, number_rows):
    config = dict(out=str(tmp_path / "never.zarr"), teacher=str(family_models["teacher"]),
                  student=str(family_models["student"]), dataset=str(number_rows), passes=("adpa",),
                  cross_tokenizer=True, **COMMON)
    with pytest.raises(ValueError, match="give --reference"):
        run_teacher(TeacherConfig(**config))
    with pytest.raises(chat.TokenizerMismatch, match="with the teacher's tokenizer"):
        run_teacher(TeacherConfig(reference=str(family_models["student"]), **config))
    assert not (tmp_path / "never.zarr").exists()


def test_without_the_flag_another_tokenizer_is_refused_saying_how_to_allow_it(tmp_path, family_models, number_rows):
    with pytest.raises(chat.TokenizerMismatch, match="add --cross-tokenizer"):
        run_teacher(TeacherConfig(out=str(tmp_path / "never.zarr"), teacher=str(family_models["teacher"]),
                                  student=str(family_models["student"]), dataset=str(number_rows), **COMMON))


def test_a_student_of_neither_tokenizer_is_refused_naming_both(cross_store, family_models, tmp_path):
    out, _ = cross_store
    with pytest.raises(TrainError) as refused:
        train(TrainConfig(cache=str(out), out=str(tmp_path / "run"), method="kd", student=str(family_models["teacher"]),
                          max_steps=1, **COMMON))
    message = str(refused.value)
    record = StoreReader.open(str(out)).attrs[fmt.ATTR_CROSS_TOKENIZER]
    assert record["student_tokenizer"]["hash"][:12] in message and record["teacher_tokenizer"]["hash"][:12] in message


@pytest.mark.slow
def test_on_a_cluster_the_cross_tokenizer_store_is_the_same(tmp_path, cross_store, family_models, number_rows):
    """``--cluster``: each part a unit on a worker process (the rows each step reads as text shipped with it): the
    same sections, checksum for checksum, as the run in one process."""
    from distributed import LocalCluster

    from tests import store_helpers

    out = tmp_path / "cluster.zarr"
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=":0")
    try:
        run_teacher(TeacherConfig(
            out=str(out), teacher=str(family_models["teacher"]), student=str(family_models["student"]),
            reference=str(family_models["reference"]), dataset=str(number_rows), passes=("pairs", "dpo_ref", "adpa"),
            top_k=6, max_length=64, max_new_tokens=8, examples_per_part=4, cross_tokenizer=True,
            cluster=cluster.scheduler_address, **COMMON))
    finally:
        cluster.close()

    def sections(path):
        return {p: (a.get("complete"), a.get("checksums"))
                for p, a in store_helpers.section_attrs(TeacherStore.open(str(path))).items()}

    assert sections(out) == sections(cross_store[0])
