"""What the teacher side (``precompute``) and the student side (``train``) share: language models, command lines.

- :mod:`lm.models`: resolving and loading models and tokenizers (local directories,
  GGUF files, the embedded teacher and demo student), weight hashes, device and dtype.
- :mod:`lm.chat`: the one way an example becomes token ids (chat templates, end of
  turn, truncation), the pad-id rule, tokenizer hashes and the same-tokenisation check.
- :mod:`lm.head`: a causal LM split into decoder and output layer (soft-capping and
  logit scale included), checked against the model's own logits.
- :mod:`lm.options`: command-line options built from the configuration dataclasses, and
  the option sets every command shares (device, dtype, storage options, data, ...), each declared once.
- :mod:`lm.cli`: what every command line does when its work fails (one line, an exit status).

Both sides import this package and neither imports the other, so they tokenise
and split models identically by construction.
"""
