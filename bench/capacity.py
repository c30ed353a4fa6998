#!/usr/bin/env python3
"""Capacity simulation: which BacklogPerInstance target to track, and what it costs.

A discrete-time (1 s) simulation of the worker fleet under three arrival patterns,
for a few target values, with what the fleet really does:

- **jobs**: audio lengths log-normal around a 10-minute call (capped at 4 h); a job
  holds one worker for ``audio_s x RTF`` plus a fixed overhead, with the per-stage
  real-time factors measured by ``bench/stages.py`` (bench/README.md, "stages": ingest
  0.0006, diarize 0.0181, transcribe 0.0462, align 0.0, features 0.0041, merge 0.0;
  model load 9.0 s). Those were measured on 2 CPU cores; no GPU figure exists yet
  (bench/gpu.py has not run on a GPU), so ``--speedup`` scales them and defaults to 1
  (conservative: a GPU worker is faster, so waits here are upper bounds);
- **arrivals**: ``steady`` (Poisson), ``bursty`` (a low Poisson base plus bursts of
  40 jobs at once, every 2 h on average), ``daynight`` (a rate following office hours,
  peaking at 4x the mean around 14:00, near zero at night);
- **instances**: a new one serves after boot + image pull (``--boot-s``, an assumption:
  not measured here) + model load (9.0 s, measured); it is billed from launch;
- **scaling**: the template's target tracking on ``BacklogPerInstance`` = (waiting +
  running) / in-service instances, one datapoint a minute: scale out when 3 datapoints
  in a row exceed the target, to ceil(backlog / target); scale in when 15 in a row are
  below 90 % of it, never removing a busy worker (scale-in protection); min and max
  as in ``infra/worker-asg.yaml``;
- **cost**: the on-demand base at the on-demand price, instances above it at the spot
  price (``--on-demand-usd``/``--spot-usd``: g4dn.xlarge list prices, us-east-1, an
  assumption), per audio hour processed.

Prints one JSON line: per pattern and target (means over ``--seeds`` runs), p50/p95
queue wait, instance-hours and cost per audio hour, and the chosen target: the largest
(cheapest) one whose p95 wait stays within ``--max-p95-wait-s`` under every pattern,
or, for a pattern where no target can (a burst bigger than the fleet's maximum), within
10 % of the best p95 any target reaches.

usage: bench/capacity.py [--hours 24] [--targets 1,2,3,4,6,8] [--seed 7] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field

# bench/README.md, "stages" (bench/stages.py, 5th session, conv_2spk_10min.wav on 2 CPU cores)
STAGE_RTF = {"ingest": 0.0006, "diarize": 0.0181, "transcribe": 0.0462, "align": 0.0, "features": 0.0041, "merge": 0.0}
MODEL_LOAD_S = 9.0
# per job outside the stage bodies: bench/overhead.py measured 0.14-0.37 s; rounded up
JOB_OVERHEAD_S = 0.5
DAY_S = 24 * 3600


@dataclass
class Instance:
    launched: float
    ready_at: float
    busy_until: float = 0.0


@dataclass
class Run:
    waits: list[float] = field(default_factory=list)
    instance_s: float = 0.0
    on_demand_s: float = 0.0
    audio_s: float = 0.0
    max_instances: int = 0
    unfinished: int = 0


def job_length_s(rng: random.Random) -> float:
    return min(4 * 3600.0, rng.lognormvariate(math.log(600.0), 0.8))


def arrivals(pattern: str, hours: float, jobs_per_hour: float, rng: random.Random) -> list[float]:
    """Arrival times (s) over ``hours``, averaging ``jobs_per_hour``."""
    end = hours * 3600
    times: list[float] = []
    if pattern == "steady":
        t = rng.expovariate(jobs_per_hour / 3600)
        while t < end:
            times.append(t)
            t += rng.expovariate(jobs_per_hour / 3600)
    elif pattern == "bursty":
        base = jobs_per_hour * 0.5
        burst_size, bursts_per_hour = 40, 0.5
        t = rng.expovariate(base / 3600)
        while t < end:
            times.append(t)
            t += rng.expovariate(base / 3600)
        t = rng.expovariate(bursts_per_hour / 3600)
        while t < end:
            times.extend(t + rng.uniform(0, 30) for _ in range(burst_size))
            t += rng.expovariate(bursts_per_hour / 3600)
    elif pattern == "daynight":
        # rate(h) ~ max(0, sin) over 07:00-21:00, near zero at night; scaled to the mean
        def shape(t: float) -> float:
            hour = (t % DAY_S) / 3600
            return max(0.02, math.sin(math.pi * (hour - 7) / 14)) if 7 <= hour <= 21 else 0.02

        mean_shape = sum(shape(h * 60.0) for h in range(0, DAY_S // 60)) / (DAY_S // 60)
        peak = jobs_per_hour / mean_shape / 3600
        t = 0.0
        while True:  # thinning: Poisson at the peak rate, kept with probability shape
            t += rng.expovariate(peak)
            if t >= end:
                break
            if rng.random() < shape(t):
                times.append(t)
    else:
        raise ValueError(pattern)
    return sorted(times)


def simulate(
    arrival_times: list[float],
    lengths: list[float],
    *,
    target: float,
    hours: float,
    min_size: int,
    max_size: int,
    on_demand_base: int,
    start_s: float,
    speedup: float,
) -> Run:
    rtf = sum(STAGE_RTF.values()) / speedup
    run = Run()
    fleet = [Instance(-start_s, 0.0) for _ in range(min_size)]  # the minimum is up at the start
    queue: list[tuple[float, float]] = []  # (arrival, service seconds)
    datapoints: list[float] = []
    end = hours * 3600
    # let the last jobs finish (but the metric stops mattering at the end)
    horizon = end + 6 * 3600
    i = 0
    t = 0.0
    while t < horizon:
        while i < len(arrival_times) and arrival_times[i] <= t:
            queue.append((arrival_times[i], lengths[i] * rtf + JOB_OVERHEAD_S))
            run.audio_s += lengths[i]
            i += 1
        for inst in fleet:
            if queue and inst.ready_at <= t and inst.busy_until <= t:
                arrived, service = queue.pop(0)
                run.waits.append(t - arrived)
                inst.busy_until = t + service
        if int(t) % 60 == 0:
            in_service = [x for x in fleet if x.ready_at <= t]
            running = sum(1 for x in in_service if x.busy_until > t)
            backlog = len(queue) + running
            metric = backlog / len(in_service) if in_service else float(backlog)
            datapoints.append(metric)
            wanted = max(min_size, min(max_size, math.ceil(backlog / target)))
            if len(datapoints) >= 3 and all(d > target for d in datapoints[-3:]) and wanted > len(fleet):
                fleet += [Instance(t, t + start_s) for _ in range(wanted - len(fleet))]
            elif len(datapoints) >= 15 and all(d < 0.9 * target for d in datapoints[-15:]) and wanted < len(fleet):
                # idle workers only (scale-in protection): booting ones first, then idle ones
                removable = sorted((x for x in fleet if x.busy_until <= t), key=lambda x: -x.ready_at)
                for inst in removable[: len(fleet) - wanted]:
                    fleet.remove(inst)
        billed = len(fleet)
        run.instance_s += billed
        run.on_demand_s += min(billed, on_demand_base)
        run.max_instances = max(run.max_instances, billed)
        if t >= end and not queue and i >= len(arrival_times) and all(x.busy_until <= t for x in fleet):
            break
        t += 1.0
    run.unfinished = len(queue) + (len(arrival_times) - i)
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--jobs-per-hour", type=float, default=120.0, help="mean arrival rate")
    ap.add_argument("--targets", default="1,2,3,4,6,8")
    ap.add_argument("--patterns", default="steady,bursty,daynight")
    ap.add_argument("--boot-s", type=float, default=150.0, help="launch to container start (assumed)")
    ap.add_argument("--speedup", type=float, default=1.0, help="GPU speed over the measured CPU stages")
    ap.add_argument("--min-size", type=int, default=1)
    ap.add_argument("--max-size", type=int, default=10)
    ap.add_argument("--on-demand-base", type=int, default=1)
    ap.add_argument("--on-demand-usd", type=float, default=0.526, help="per hour (g4dn.xlarge, us-east-1)")
    ap.add_argument("--spot-usd", type=float, default=0.22, help="per hour (g4dn.xlarge spot, typical)")
    ap.add_argument("--max-p95-wait-s", type=float, default=300.0, help="the wait a caller accepts")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--seeds", type=int, default=3, help="runs per pattern and target, averaged")
    a = ap.parse_args()
    targets = [float(x) for x in a.targets.split(",")]
    start_s = a.boot_s + MODEL_LOAD_S
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for pattern in a.patterns.split(","):
        results[pattern] = {}
        for target in targets:
            per_seed = []
            for seed in range(a.seed, a.seed + a.seeds):
                rng = random.Random(seed)
                times = arrivals(pattern, a.hours, a.jobs_per_hour, rng)
                lengths = [job_length_s(rng) for _ in times]
                run = simulate(
                    times,
                    lengths,
                    target=target,
                    hours=a.hours,
                    min_size=a.min_size,
                    max_size=a.max_size,
                    on_demand_base=a.on_demand_base,
                    start_s=start_s,
                    speedup=a.speedup,
                )
                cost = (run.on_demand_s * a.on_demand_usd + (run.instance_s - run.on_demand_s) * a.spot_usd) / 3600
                per_seed.append(
                    {
                        "jobs": len(times),
                        "p50_wait_s": percentile(run.waits, 0.50),
                        "p95_wait_s": percentile(run.waits, 0.95),
                        "instance_hours": run.instance_s / 3600,
                        "max_instances": run.max_instances,
                        "cost_usd_per_audio_hour": cost / (run.audio_s / 3600),
                        "unfinished": run.unfinished,
                    }
                )
            # the mean over the seeds: one seed's bursts can land anywhere
            results[pattern][f"{target:g}"] = {
                k: round(sum(r[k] for r in per_seed) / len(per_seed), 4 if k.startswith("cost") else 1)
                for k in per_seed[0]
            }
    # A target meets a pattern when its p95 wait is within the acceptable wait, or, where no
    # target can (bursts larger than max_size workers clear in that time), within 10 % of the best.
    bound = {
        p: max(a.max_p95_wait_s, 1.1 * min(float(r["p95_wait_s"] or 0) for r in results[p].values())) for p in results
    }
    meeting = [
        t
        for t in targets
        if all(float(results[p][f"{t:g}"]["p95_wait_s"] or 0) <= bound[p] for p in results)
        and all(results[p][f"{t:g}"]["unfinished"] == 0 for p in results)
    ]
    chosen = max(meeting) if meeting else None
    print(
        json.dumps(
            {
                "bench": "capacity",
                "hours": a.hours,
                "jobs_per_hour": a.jobs_per_hour,
                "job_rtf": round(sum(STAGE_RTF.values()) / a.speedup, 4),
                "instance_start_s": start_s,
                "speedup": a.speedup,
                "max_p95_wait_s": a.max_p95_wait_s,
                "seeds": a.seeds,
                "results": results,
                "p95_bound_s": {p: round(b, 1) for p, b in bound.items()},
                "chosen_target": chosen,
                "rule": "largest target whose p95 wait is within p95_bound_s under every pattern (max_p95_wait_s, "
                "or 10 % above the best any target reaches where none reaches it)",
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
