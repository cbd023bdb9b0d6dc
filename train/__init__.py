"""Training a student from a teacher-signal store.

- :mod:`train.losses`: one pure function per loss (KD with a tail bucket, ADPA, DPO, SimPO, PAD), and the
  table of per-token terms the chunked output layer computes.
- :mod:`train.batches`: store examples -> token-budget batches -> padded tensors.
- :mod:`train.methods`: methods as weighted sums of terms; the loss settings; the student's chunked forward.
- :mod:`train.config`: every option of ``train student`` and ``train evaluate``, each declared once.
- :mod:`train.preflight`: everything checked before a student loads (store, signals, student, batches).
- :mod:`train.trainer`: ``train student``, the loop (stream, accumulate, step, log, checkpoint).
- :mod:`train.checkpoint`, :mod:`train.records`: what a run writes (checkpoints; metrics, curves, config, model).
- :mod:`train.evaluate`: ``train evaluate``, held-out KL to the teacher and preference accuracy.
- :mod:`train.cli`: the ``train`` command.

The teacher is never loaded here: everything it contributes comes from the store.
"""
