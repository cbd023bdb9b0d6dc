"""A causal LM as two pieces: the decoder and the output layer.

Both sides of the product run the output layer on chosen rows only: the teacher
passes on the rows that predict response tokens (a ``[tokens, vocabulary]``
tensor never exists for the prompt), the trainer in row chunks under activation
checkpointing. They split a model here, in one way:

- the decoder is ``getattr(model, model.base_model_prefix)`` and returns
  ``last_hidden_state``;
- the output layer is ``model.get_output_embeddings()`` followed by what some
  architectures apply to its result before the softmax: final logit
  soft-capping ``cap * tanh(logits / cap)`` (Gemma 2's
  ``final_logit_softcapping``) and a constant ``logit_scale`` (Cohere).

:func:`check_split` proves, on a real sequence, that decoder + output layer
reproduce the model's own ``forward`` logits before either side relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["OutputLayer", "split_model", "check_split"]


@dataclass(frozen=True)
class OutputLayer:
    """``logits(hidden)``: the model's output layer, with soft-capping and scale, upcast to >= float32."""

    module: torch.nn.Module
    softcap: float | None = None
    scale: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if logits.dtype != torch.float64:
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale is not None and self.scale != 1:
            logits = logits * self.scale
        return logits


def split_model(model) -> tuple[torch.nn.Module, OutputLayer]:
    """``(decoder, output layer)`` of a transformers causal LM; ValueError when it cannot be split."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot split into decoder and output layer")
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return decoder, OutputLayer(head, float(cap) if cap else None,
                                float(scale) if isinstance(scale, (int, float)) else None)


@torch.no_grad()
def check_split(model, sequence: np.ndarray, prompt_length: int, atol: float = 1e-3) -> None:
    """Refuse a model whose decoder + output layer differ from its own logits on ``sequence``'s response.

    RuntimeError naming the model class and the largest difference of the
    response tokens' log-probs.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(sequence, dtype=np.int64))[None].to(device)
    full = torch.log_softmax(model(input_ids=ids).logits[0, prompt_length - 1:-1].double(), -1)
    decoder, head = split_model(model)
    hidden = decoder(input_ids=ids).last_hidden_state[0, prompt_length - 1:-1]
    fast = torch.log_softmax(head.logits(hidden).double(), -1)
    targets = ids[0, prompt_length:, None]
    expected, got = full.gather(-1, targets)[:, 0], fast.gather(-1, targets)[:, 0]
    err = float((expected - got).abs().max())
    if err > atol * max(1.0, float(expected.abs().max())):
        raise RuntimeError(f"{type(model).__name__}: decoder + output layer differ from the model's logits "
                           f"by {err:.2e}; this architecture needs the full forward path")
