"""The dask scheduler's load with --cluster: 10,000 parts of no-op work through the project's own submission path.

Each part is a :class:`precompute.cluster.Unit` whose function does nothing
but what every real unit does around its work (``part_task``: the outcome,
start and stop times, the worker's log), submitted and collected by
:meth:`precompute.cluster.ClusterSession.run` exactly as ``precompute teacher
--cluster`` does (explicit keys, priorities, retries, one progress counter,
results dropped once counted), on a ``LocalCluster`` of ``--workers``
processes with one thread each. Two shapes:

- ``independent``: ``--parts`` units of one step (``precompute sample``, or one
  pass's parts);
- ``chain``: ``--parts`` units as the adpa pass makes them, three steps per part
  (generated/base -> teacher -> reference), each waiting for its part's previous unit.

It prints the parts, the wall time, units per second and the overhead per unit
(wall time x workers / units: the worker time a unit costs when its work is
nothing), with the coordinator's CPU time per unit (submission, bookkeeping,
the scheduler: in ``local:N`` the scheduler runs in the coordinator's process).

    python benchmarks/scheduler_load.py [--parts 10000] [--workers 2] [--shapes independent,chain]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute import cluster  # noqa: E402

CHAIN = ("generated/base", "generated/teacher", "generated/reference")


def noop_unit(step: str, split: str, part: int, *_after) -> dict:
    """A unit whose work is nothing: the bookkeeping every unit does around its part."""
    with cluster.part_task(step, split, part) as outcome:
        outcome.update(computed=True, written=True, tokens=0)
    return outcome


def units_of(shape: str, parts: int) -> list[cluster.Unit]:
    if shape == "independent":
        return [cluster.Unit("samples/base", "train", p, noop_unit, ("samples/base", "train", p))
                for p in range(parts)]
    units = []
    per_step = parts // len(CHAIN)
    for index, step in enumerate(CHAIN):
        for p in range(per_step):
            after = ((CHAIN[index - 1], "train", p),) if index else ()
            units.append(cluster.Unit(step, "train", p, noop_unit, (step, "train", p), after=after,
                                      priority=len(CHAIN) - index))
    return units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=int, default=10_000, help="units per shape")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shapes", default="independent,chain")
    args = ap.parse_args()

    print(f"LocalCluster of {args.workers} no-op worker process(es), one thread each; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with cluster.ClusterSession(f"local:{args.workers}", torch_threads=1, echo=lambda line: None) as session:
        session.run(units_of("independent", 50), progress=False)  # warm-up: imports on the workers
        for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            units = units_of(shape, args.parts)
            cpu0, t0 = time.process_time(), time.perf_counter()
            done = session.run(units, desc=shape, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            assert len(done) == len(units) and all(outcome["written"] for _, outcome in done)
            per_worker = sorted(sum(1 for _, o in done if o["worker"] == w)
                                for w in {o["worker"] for _, o in done})
            print(f"  {shape:<12} {len(units):>6} units in {wall:6.1f} s = {len(units) / wall:7.0f} units/s; "
                  f"overhead per unit {1e3 * wall * args.workers / len(units):6.2f} ms of worker time, "
                  f"{1e3 * cpu / len(units):5.2f} ms of coordinator CPU; units per worker {per_worker}",
                  flush=True)


if __name__ == "__main__":
    main()
