"""What a run shows and writes: notes, the progress bar, metrics, checkpoints, the model, the loss curves.

Every process of a run makes the same calls at the same points of the loop; the process
of rank 0 (the only one, on one process) has a :class:`RunOutput`, which prints and
writes, the others a :class:`NoOutput`, whose methods do nothing (:func:`output_for`).
What each file holds and what a kill leaves of it: :mod:`train.records`,
:mod:`train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING

from store.locations import redact_text, secret_values

from . import checkpoint, records
from .checkpoint import Position

if TYPE_CHECKING:
    from .distributed import Context
    from .preflight import Plan


class RunOutput:
    """Rank 0's output: notes on stderr, the progress bar, and every file of the run's directory."""

    def __init__(self, plan: "Plan"):
        self.plan, self.out, self.config = plan, plan.out, plan.config
        self.metrics = self.board = self.bar = None
        # what the store's location and the --storage-option values hold, never printed (as train's CLI does)
        self.secrets = secret_values(self.config.storage_options, [str(self.config.cache or "")])

    def note(self, message: str) -> None:
        print(redact_text(message, self.secrets), file=sys.stderr)

    def start(self, position: Position) -> None:
        """Before the first step: the run's directory made; resuming, the records logged after the checkpoint
        dropped (they will be logged again); starting afresh, what a run stopped before its first checkpoint left
        removed (pre-flight's note named it); then ``config.yaml``."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.config.resume:
            records.truncate_metrics(self.out / records.METRICS_FILE, position.step)
            if position.step >= self.plan.total_steps:
                self.note(f"note: the checkpoint in {self.out} is the run's last (step {position.step}); "
                          f"writing its model")
        else:
            checkpoint.discard_unfinished(self.out)
        records.save_config(self.plan)

    @contextlib.contextmanager
    def recording(self, position: Position):
        """For the loop: the progress bar, ``metrics.jsonl`` (appended to when resuming) and, with
        ``--report-to tensorboard``, the TensorBoard events; closed when it ends."""
        from tqdm.auto import tqdm

        config = self.config
        self.bar = tqdm(total=self.plan.total_steps, initial=position.step, desc=f"train {config.method}",
                        unit="step", disable=not config.progress, dynamic_ncols=True)
        try:
            with contextlib.ExitStack() as closing:
                self.metrics = closing.enter_context(open(self.out / records.METRICS_FILE,
                                                          "a" if config.resume else "w"))
                if config.report_to == "tensorboard":
                    self.board = records.TensorBoard(self.out, purge_step=position.step + 1 if config.resume
                                                     else None)
                    closing.callback(self.board.close)
                yield self
        finally:
            self.bar.close()

    def step(self) -> None:
        """An optimizer step made."""
        self.bar.update(1)

    def log(self, record: dict) -> None:
        """A metrics record (:class:`train.records.Meter`): in ``metrics.jsonl``, TensorBoard, the progress bar."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.board is not None:
            self.board.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def save_checkpoint(self, state: dict, scheduler, position: Position, meter: dict | None = None) -> None:
        """A checkpoint of ``state`` (:meth:`train.distributed.ParallelStudent.state`), the scheduler, ``position``
        and the metrics' sums since the last record (:meth:`train.records.Meter.partial`)."""
        checkpoint.write_checkpoint(self.out, state["model"], state["optimizer"], scheduler, position, self.config,
                                    state["processes"], meter)

    def save_model(self, model, tokenizer, weights: dict | None) -> None:
        """The trained model (``weights`` instead of the model's own when given: gathered from FSDP's shards)."""
        records.save_model(self.out, model, tokenizer, state_dict=weights)

    def finish(self) -> None:
        """``loss_curves.png`` from ``metrics.jsonl``."""
        records.plot_losses(self.out / records.METRICS_FILE, self.out / records.CURVES_FILE)


class NoOutput:
    """The output of a process other than rank 0's: the calls of :class:`RunOutput`, doing nothing."""

    def note(self, message: str) -> None:
        pass

    def start(self, position: Position) -> None:
        pass

    @contextlib.contextmanager
    def recording(self, position: Position):
        yield self

    def step(self) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def save_checkpoint(self, state: dict | None, scheduler, position: Position, meter: dict | None = None) -> None:
        pass

    def save_model(self, model, tokenizer, weights: dict | None) -> None:
        pass

    def finish(self) -> None:
        pass


def output_for(plan: "Plan", context: "Context") -> RunOutput | NoOutput:
    """This process's output: rank 0 shows and writes, the others do not."""
    return RunOutput(plan) if context.main else NoOutput()
