"""``precompute``: run the teacher passes into a store (thin: parse, validate, call)."""

from __future__ import annotations

import sys

import click

from . import teacher as pipeline


def _parse_options(values: tuple[str, ...], what: str) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=what)
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Compute teacher signals once into a chunked Zarr store."""


@main.command()
@click.option("--out", required=True, help="Store path or fsspec URL (created, or completed if it exists).")
@click.option("--teacher", default=None, help="Teacher: model dir, .gguf file or cached name [embedded SmolLM2-135M-Instruct].")
@click.option("--student", default=None, help="Student's initial model (DPO reference, ADPA answers) [embedded demo student].")
@click.option("--reference", default=None, help="ADPA reference model (e.g. the teacher's SFT checkpoint) [the student's initial model].")
@click.option("--dataset", default=None, help="JSON/JSONL(.gz)/Parquet/CSV file, a saved `datasets` dir, or a dataset name [bundled demo set].")
@click.option("--split", "splits", default="train,test", show_default=True, help="Comma list of splits.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N rows of each split.")
@click.option("--top-k", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--max-length", type=click.IntRange(min=16), default=512, show_default=True, help="Tokens per sequence; prompts are cut from the left.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Length limit of generated answers (ADPA); raise it for real teachers.")
@click.option("--batch-tokens", type=click.IntRange(min=64), default=4096, show_default=True, help="Padded tokens per forward batch.")
@click.option("--generation-batch", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per generate() call.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16.")
@click.option("--passes", default=",".join(pipeline.DEFAULT_PASSES), show_default=True,
              help=f"Comma list of {', '.join(pipeline.KNOWN_PASSES)}.")
@click.option("--column", "columns", multiple=True, help="Map a field to a column: prompt=question (repeatable).")
@click.option("--strict", is_flag=True, help="Stop at the first bad row instead of skipping it.")
@click.option("--examples-per-part", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--storage-option", "storage_options", multiple=True, help="fsspec option KEY=VALUE (repeatable).")
@click.option("--mcq-template", default=None, type=click.Path(dir_okay=False),
              help="PAD: multiple-choice prompt with {question}, {option_a}, {option_b} [precompute/templates/mcq.txt].")
@click.option("--no-progress", is_flag=True)
def teacher(out, teacher, student, reference, dataset, splits, limit, top_k, max_length, max_new_tokens,
            batch_tokens, generation_batch, device, dtype, passes, columns, strict, examples_per_part, storage_options,
            mcq_template, no_progress):
    """Run the teacher passes (default: what dckd+adpa needs) into --out."""
    from store import StoreError

    from lm.chat import TokenizerMismatch
    from .dataset import DataError
    from lm.models import ModelNotFoundError

    config = pipeline.TeacherConfig(
        out=out, teacher=teacher, student=student, reference=reference, dataset=dataset,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), limit=limit, top_k=top_k,
        max_length=max_length, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, generation_batch=generation_batch, device=device,
        dtype=dtype, passes=tuple(p.strip() for p in passes.split(",") if p.strip()),
        columns=_parse_options(columns, "--column") or None, strict=strict, examples_per_part=examples_per_part,
        storage_options=_parse_options(storage_options, "--storage-option") or None, progress=not no_progress,
        mcq_template=mcq_template,
    )
    try:
        summary = pipeline.run_teacher(config)
    except (DataError, TokenizerMismatch, StoreError, ModelNotFoundError, ValueError, NotImplementedError) as exc:
        click.echo(f"precompute teacher: {exc}", err=True)
        sys.exit(2)
    click.echo("\n".join(summary.lines()))


@main.command()
@click.option("--out", required=True, help="Store path or fsspec URL (created, or completed if it exists).")
@click.option("--model", default=None, help="Model that samples (the student's initial model) [embedded demo student].")
@click.option("--dataset", default=None, help="Prompts: preference or prompt-only rows, same sources as `teacher` [bundled demo set].")
@click.option("--split", "splits", default="train,test", show_default=True, help="Comma list of splits.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N rows of each split.")
@click.option("--n", "n", type=click.IntRange(min=2), default=5, show_default=True, help="Responses drawn per prompt.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True)
@click.option("--keep", type=click.IntRange(min=2), default=4, show_default=True,
              help="Most diverse responses kept per prompt (greedy max-min token edit distance).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-length", type=click.IntRange(min=16), default=512, show_default=True,
              help="Prompts are cut from the left to max-length minus max-new-tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Part p of train draws with seed + p.")
@click.option("--generation-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts per generate() call (each drawn n times).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16.")
@click.option("--column", "columns", multiple=True, help="Map a field to a column: prompt=question (repeatable).")
@click.option("--strict", is_flag=True, help="Stop at the first bad row instead of skipping it.")
@click.option("--examples-per-part", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--storage-option", "storage_options", multiple=True, help="fsspec option KEY=VALUE (repeatable).")
@click.option("--no-progress", is_flag=True)
def sample(out, model, dataset, splits, limit, n, temperature, top_p, keep, max_new_tokens, max_length, seed,
           generation_batch, device, dtype, columns, strict, examples_per_part, storage_options, no_progress):
    """Sample groups of responses per prompt into --out (PAD; then `teacher --passes pad`)."""
    from store import StoreError

    from .dataset import DataError
    from lm.models import ModelNotFoundError
    from .sample import SampleConfig, run_sample

    config = SampleConfig(
        out=out, model=model, dataset=dataset, splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        limit=limit, n=n, temperature=temperature, top_p=top_p, keep=keep, max_new_tokens=max_new_tokens,
        max_length=max_length, seed=seed, generation_batch=generation_batch, device=device, dtype=dtype,
        columns=_parse_options(columns, "--column") or None, strict=strict, examples_per_part=examples_per_part,
        storage_options=_parse_options(storage_options, "--storage-option") or None, progress=not no_progress,
    )
    try:
        summary = run_sample(config)
    except (DataError, StoreError, ModelNotFoundError, ValueError) as exc:
        click.echo(f"precompute sample: {exc}", err=True)
        sys.exit(2)
    click.echo("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
