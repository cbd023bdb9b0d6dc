"""The trainer hands memory freed by a step back to the system (train.trainer.release_freed_memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import trainer
from train.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (a known allocator state): 256 MiB of 64 KiB tensors (each below glibc's mmap threshold, so
# they live in malloc's heap), then a small tensor made after them that keeps them off the heap's top, so free()
# cannot shrink the heap by itself. The resident set is read with the tensors alive, after they are freed, and
# after release_freed_memory.
FREE_THEN_RELEASE = """
import json, torch
from train.trainer import release_freed_memory

def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

before = rss()
blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 4096 x 64 KiB, every page written
pin = torch.ones(16)
alive = rss()
del blocks
freed = rss()
release_freed_memory()
print(json.dumps({"before": before, "alive": alive, "freed": freed, "released": rss()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or trainer._malloc_trim() is None,
                    reason="needs Linux's /proc and glibc's malloc_trim")
def test_release_returns_the_freed_tensors_pages_to_the_system():
    size = 4096 * 64 * 1024
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for knob in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"):
        env.pop(knob, None)  # glibc's own defaults
    done = subprocess.run([sys.executable, "-c", FREE_THEN_RELEASE], env=env, check=True, capture_output=True,
                          text=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["alive"] - rss["before"] >= 0.9 * size  # the tensors are resident
    assert rss["freed"] - rss["before"] >= 0.8 * size  # freed, glibc keeps their pages: what a step leaves behind
    assert rss["freed"] - rss["released"] >= 0.8 * size  # released: the pages go back
    assert rss["released"] - rss["before"] <= 0.2 * size


def test_the_trainer_releases_freed_memory_once_per_optimizer_step(tiny_store, tmp_path, monkeypatch):
    calls = []
    release = trainer.release_freed_memory
    monkeypatch.setattr(trainer, "release_freed_memory", lambda: (calls.append(1), release()))
    n = 3
    train(TrainConfig(cache=str(tiny_store), out=str(tmp_path / "run"), method="sft", lr=1e-3, batch_tokens=300,
                      grad_accum=2, max_steps=n, device="cpu", dtype="float32", log_every=1, progress=False))
    assert len(calls) == n  # once per optimizer step, not per accumulated batch
