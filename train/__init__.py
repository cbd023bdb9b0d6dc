"""Training a student from a teacher-signal store.

- :mod:`train.losses`: one pure function per loss (KD with a tail bucket, ADPA, DPO, SimPO, PAD).
- :mod:`train.batches`: store examples -> token-budget batches -> padded tensors.
- :mod:`train.methods`: methods as weighted sums of terms; the student's chunked forward.
- :mod:`train.trainer`: ``train student``, the loop (stream, accumulate, step, log, checkpoint).
- :mod:`train.evaluate`: ``train evaluate``, held-out KL to the teacher and preference accuracy.
- :mod:`train.cli`: the ``train`` command.

The teacher is never loaded here: everything it contributes comes from the store.
"""
