"""Chaos benchmark: the tiny pipeline killed N times at random moments, then run to completion; the
union of its output must hold every input region exactly once.

    python -m bench.chaos --rounds 20 --seed 1

Why this shape:
- One private Ray cluster (`ray start --head` in its own process session and temp dir) and the
  models deployed once by `annotate serve --address`, so a round costs a run, not a model load; the
  `annotate run` of each round joins it with `--address`, so killing that process is a real driver
  death (Ray then ends the job's read tasks and chain workers; the detached Serve models stay).
- Every round adds `--new-shards` fresh input shards, so each round has work in flight to kill even
  when the round before ran to completion (a chain-worker, read-task or replica kill usually does no
  harm: Ray Data retries, Serve restarts the replica), and shards left unfinished by a killed round
  are resumed by the next ones.
- The four kinds are dealt in shuffled cycles (seeded), so 20 rounds make 5 kills of each. The kill
  moment is random: a seeded delay after the first process of the kind appears in the round.
- Targets are found by process title among the cluster's own processes (its process session), the
  way tests/test_pipeline_crash.py finds them; Ray 2.60 titles a Ray Data actor's process
  `ray::MapWorker(MapBatches(ChainWorker))`, the map task `ray::MapBatches(read_shard)` (the
  operator name Ray Data gives the task) and a Serve replica `ray::ServeReplica:APP:DEPLOYMENT`.
- After each killed round the manifest is checked: a shard marked finished (its newest line) must
  have its file, with the sha256 of the line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from annotate.stages.chain import CORE_STAGES
from bench.harness import (copy_sample_shards, input_region_ids, kill_session, output_regions, session_pids,
                           session_processes, tiny_variant)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
KINDS = ("driver", "chain_worker", "replica", "read_task")
# Process titles (see the module docstring); the driver is the `annotate run` process itself.
TITLES = {"chain_worker": "MapBatches(ChainWorker)", "read_task": "MapBatches(read_shard)", "replica": "ServeReplica:"}
# `ray start --head` (Ray 2.60) turns token auth on when ~/.ray/auth_token exists; whatever joins the
# cluster must then run in token mode too.
CLUSTER_ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
# Small batches, one shard read at a time and one batch in flight per chain worker: shards then finish
# one after another, so a kill at any moment leaves some finished and some in flight (with 8-image
# batches two shards share each batch; with 4 batches in flight per worker all shards are in the chain
# together: both were seen to finish all shards within one 0.2 s poll). tests/test_pipeline_crash.py too.
ONE_SHARD_AT_A_TIME = {"run": {"shards_in_flight": 1, "rows_per_batch": 2, "batches_in_flight": 1},
                       "stages": {name: {"batch_size": 2} for name in CORE_STAGES}}


# ------------------------------------------------------------------------------ processes
@dataclass
class Cluster:
    """Where the rounds run: the GCS address, the process session that holds the cluster's daemons
    and workers (where targets are looked for) and the environment its drivers need."""
    address: str
    session: int
    env: dict = field(repr=False)


@contextmanager
def private_cluster(num_cpus: int = 4) -> Iterator[Cluster]:
    """`ray start --head` in a new process session, so that every daemon and worker of it shares that
    session and all of it goes at the end (not `ray stop`, which would stop other clusters too)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp_dir = f"/tmp/ray-chaos-{port}"  # short: Ray's socket paths must stay under 108 bytes
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
           "false", "--temp-dir", temp_dir, "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    starter = subprocess.Popen(cmd, env=CLUSTER_ENV, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = starter.communicate(timeout=300)
        if starter.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        yield Cluster(f"127.0.0.1:{port}", starter.pid, CLUSTER_ENV)
    finally:
        kill_session(starter.pid)


def annotate(*args: str) -> list[str]:
    return [sys.executable, "-m", "annotate.cli", *args]


# ------------------------------------------------------------------------------ checks
def newest_lines(out: Path) -> dict[tuple[str, str], dict]:
    """(output, shard) -> its newest manifest line (the last one: the driver alone appends). Read here
    from the file, not through OutputStore, so that the check does not share the runner's reading."""
    newest: dict[tuple[str, str], dict] = {}
    path = out / "manifest.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash counts as not written
        newest[(entry.get("output"), entry.get("shard"))] = entry
    return newest


def manifest_problems(out: Path) -> list[str]:
    """Shards whose newest manifest line says finished (lines without a `state` are) but whose file is
    missing or has other bytes; a `damaged` line is one too, since the chaos inputs are all intact."""
    from annotate.data.store import OutputStore

    layout = OutputStore(out)
    problems = []
    for (output, shard), entry in sorted(newest_lines(out).items()):
        path = layout.output_path(output, shard)
        if entry.get("state", "finished") != "finished":
            problems.append(f"{output}/{shard}: recorded {entry.get('state')} ({entry.get('damage', '')})")
        elif not path.exists():
            problems.append(f"{output}/{shard}: marked finished, file missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
            problems.append(f"{output}/{shard}: marked finished, sha256 differs")
    return problems


def region_counts(out: Path) -> tuple[Counter, Counter]:
    """Region ids in OUT/data, read with pyarrow (the tests' reader) and with `datasets`."""
    import datasets

    by_arrow = Counter(r["region_id"] for r in output_regions(out))
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                               cache_dir=str(out.parent / "hf-cache"))
    by_hf = Counter(r["region_id"] for regions in ds["regions"] for r in regions)
    return by_arrow, by_hf


def shard_region_ids(path: Path) -> Counter:
    import pyarrow.parquet as pq

    return Counter(r["region_id"] for regions in pq.read_table(path, columns=["regions"]).column("regions").to_pylist()
                   for r in regions or [])


def finished_final(out: Path) -> dict[str, str]:
    """shard -> sha256 of its newest `final` manifest line, when that line says finished."""
    return {shard: e.get("sha256") for (output, shard), e in newest_lines(out).items()
            if output == "final" and e.get("state", "finished") == "finished"}


# ------------------------------------------------------------------------------ rounds
@dataclass
class Round:
    index: int
    kind: str                 # what was killed: one of KINDS, or "none" for the final run
    shards: int               # the run covered shards 0..shards-1
    pending: int              # of which were not finished when it started
    delay_s: float = 0.0      # drawn: seconds after processing began (first chain worker up)
    landed: bool = False      # a live target was SIGKILLed while the run was running
    target: str = ""
    rc: int | None = None     # the run's exit code (-9: the driver was killed)
    finished: list[str] = field(default_factory=list)  # shards newly finished in this round
    lost: int = 0             # regions missing from the shards it finished
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)  # manifest lies, rewritten shards, a hung run
    wall_s: float = 0.0


def plan_kinds(rounds: int, rng: random.Random, max_replica: int) -> list[str]:
    """The kinds in shuffled cycles, so every kind comes every four rounds; model replica kills (each
    costs a model reload) stop at `max_replica`, and later cycles deal the other three."""
    plan: list[str] = []
    while len(plan) < rounds:
        cycle = [k for k in KINDS if k != "replica" or plan.count("replica") < max_replica]
        rng.shuffle(cycle)
        plan.extend(cycle)
    return plan[:rounds]


class Chaos:
    def __init__(self, cluster: Cluster, work: Path, rng: random.Random, new_shards: int = 2,
                 round_timeout: float = 900, log=print):
        self.cluster, self.work, self.rng, self.new_shards = cluster, work, rng, new_shards
        self.round_timeout, self.log = round_timeout, log
        self.input, self.out = work / "in", work / "out"
        self.config = tiny_variant(work / "chaos.yaml", ONE_SHARD_AT_A_TIME)
        self.pace = 4.0  # seconds of processing per shard, learnt from the rounds that ran to the end
        self.shards = 0

    def serve(self) -> None:
        """Deploy the models once (a later `serve` or run finds them RUNNING and reuses them)."""
        proc = subprocess.run(annotate("serve", "--config", str(self.config), "--address", self.cluster.address),
                              env=self.cluster.env, cwd=self.work, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"annotate serve failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")

    def _start(self, index: int) -> subprocess.Popen:
        cmd = annotate("run", "--stage", "all", "--shards", f"0-{self.shards - 1}", "--input", str(self.input),
                       "--output", str(self.out), "--config", str(self.config), "--address", self.cluster.address)
        with open(self.work / f"round-{index:02d}.log", "w") as log:
            return subprocess.Popen(cmd, env=self.cluster.env, cwd=self.work, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _targets(self, kind: str, proc: subprocess.Popen) -> list[int]:
        if kind == "driver":
            return [proc.pid]
        return session_pids(TITLES[kind], self.cluster.session)

    def _wait(self, proc: subprocess.Popen, until, timeout: float) -> bool:
        """Poll `until()` while the run lives; False when the run ended (or time ran out) first."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if until():
                return True
            time.sleep(0.1)
        return False

    def play(self, index: int, kind: str) -> Round:
        started = time.monotonic()
        self.shards += self.new_shards
        copy_sample_shards(self.input, self.shards)
        before = finished_final(self.out)
        rnd = Round(index, kind, self.shards, pending=self.shards - len(before))
        proc = self._start(index)
        try:
            processing = self._wait(proc, lambda: session_pids(TITLES["chain_worker"], self.cluster.session),
                                    self.round_timeout)
            began = time.monotonic()
            if kind != "none" and processing:
                rnd.delay_s = round(self.rng.uniform(0, self.pace * max(rnd.pending, 1)), 2)
                self._wait(proc, lambda: time.monotonic() - began >= rnd.delay_s, rnd.delay_s + 1)
                # A read task may be between shards at that moment: the kill goes to the next one.
                if self._wait(proc, lambda: self._targets(kind, proc), self.round_timeout):
                    pid = self.rng.choice(sorted(self._targets(kind, proc)))
                    rnd.target = f"{pid} {session_processes(self.cluster.session).get(pid, '?')[:80]}".strip()
                    if proc.poll() is None:
                        os.kill(pid, signal.SIGKILL)
                        rnd.landed = True
            try:
                rnd.rc = proc.wait(timeout=max(1.0, self.round_timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                rnd.problems.append(f"the run hung for {self.round_timeout:.0f} s after the kill; killed")
                os.kill(proc.pid, signal.SIGKILL)
                rnd.rc = proc.wait()
            if rnd.rc == 0 and kind not in ("replica", "driver") and rnd.pending:
                self.pace = 0.5 * self.pace + 0.5 * (time.monotonic() - began) / rnd.pending
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._settle()
        self._check(rnd, before)
        rnd.wall_s = round(time.monotonic() - started, 1)
        self.log(f"round {index:2d} {kind:12s} landed={rnd.landed!s:5s} delay={rnd.delay_s:5.1f}s rc={rnd.rc} "
                 f"finished={len(rnd.finished)} lost={rnd.lost} dup={rnd.duplicated} {rnd.wall_s:.0f}s "
                 f"{'; '.join(rnd.problems)}")
        return rnd

    def _settle(self, timeout: float = 60) -> None:
        """A dead driver's read tasks and chain workers are ended by Ray, not at once: the next round
        starts when they are gone, so two rounds never share the output (the lock is the driver's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                session_pids(TITLES[k], self.cluster.session) for k in ("chain_worker", "read_task")):
            time.sleep(0.5)

    def _check(self, rnd: Round, before: dict[str, str]) -> None:
        after = finished_final(self.out)
        rnd.problems += manifest_problems(self.out)
        rnd.problems += [f"final/{s}: finished shard written again" for s in before if after.get(s) != before[s]]
        rnd.finished = sorted(set(after) - set(before))
        for shard in rnd.finished:
            expected = input_region_ids(self.input, [int(shard)])
            seen = shard_region_ids(self.out / "data" / f"{shard}.parquet")
            rnd.lost += sum((expected - seen).values())
            rnd.duplicated += sum((seen - expected).values())

    def union(self) -> dict:
        """The whole output against every input region, read with pyarrow and with `datasets`."""
        expected = input_region_ids(self.input, list(range(self.shards)))
        result = {"regions_expected": sum(expected.values())}
        for reader, seen in zip(("pyarrow", "datasets"), region_counts(self.out)):
            result[reader] = {"lost": sum((expected - seen).values()), "duplicated": sum((seen - expected).values())}
        return result


def summarize(rounds: list[Round], final: Round, union: dict) -> dict:
    by_kind = {}
    for kind in KINDS:
        mine = [r for r in rounds if r.kind == kind]
        by_kind[kind] = {"kills": len(mine), "landed": sum(r.landed for r in mine),
                         "run_finished_first": [r.index for r in mine if not r.landed],
                         "run_survived": sum(r.landed and r.rc == 0 for r in mine),
                         "lost": sum(r.lost for r in mine), "duplicated": sum(r.duplicated for r in mine),
                         "problems": [f"round {r.index}: {p}" for r in mine for p in r.problems]}
    failed = bool(final.rc != 0 or final.lost or final.duplicated or final.problems
                  or any(v["lost"] or v["duplicated"] for k, v in union.items() if k != "regions_expected")
                  or any(r.lost or r.duplicated or r.problems for r in rounds))
    return {"by_kind": by_kind, "final": asdict(final), "union": union, "ok": not failed,
            "round_log": [asdict(r) for r in rounds]}


def run_chaos(cluster: Cluster, work: Path, rounds: int, seed: int, max_replica: int, new_shards: int = 2,
              log=print) -> dict:
    """Serve the models, play the rounds, run to completion, check; returns the summary."""
    rng = random.Random(seed)
    chaos = Chaos(cluster, work, rng, new_shards=new_shards, log=log)
    started = time.monotonic()
    chaos.serve()
    log(f"models up ({time.monotonic() - started:.0f} s); work in {work}")
    plan = plan_kinds(rounds, rng, max_replica)
    played = [chaos.play(i, kind) for i, kind in enumerate(plan)]
    chaos.new_shards = 0  # the final run adds no shard: it finishes what the rounds left
    final = chaos.play(rounds, "none")
    summary = summarize(played, final, chaos.union())
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    summary.update(seed=seed, rounds=rounds, shards=chaos.shards, wall_s=round(time.monotonic() - started, 1),
                   commit=commit.stdout.strip() or "unknown")
    return summary


def print_table(summary: dict, log=print) -> None:
    log(f"{'kind':13s} {'kills':>5s} {'landed':>6s} {'survived':>8s} {'lost':>5s} {'dup':>5s}  run finished before the kill")
    for kind, row in summary["by_kind"].items():
        log(f"{kind:13s} {row['kills']:5d} {row['landed']:6d} {row['run_survived']:8d} {row['lost']:5d} "
            f"{row['duplicated']:5d}  {row['run_finished_first'] or '-'}")
    union = summary["union"]
    log(f"final run rc={summary['final']['rc']}; {union['regions_expected']} regions expected over "
        f"{summary['shards']} shards; pyarrow {union['pyarrow']}, datasets {union['datasets']}; "
        f"{'OK' if summary['ok'] else 'FAILED'} in {summary['wall_s']:.0f} s (seed {summary['seed']}, commit {summary['commit']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-replica-kills", type=int, default=None,
                        help="default: 15%% of the rounds, at least 1 (each costs a model reload)")
    parser.add_argument("--new-shards", type=int, default=2, help="input shards added each round")
    parser.add_argument("--work", type=Path, default=None, help="default: a new folder under /tmp")
    parser.add_argument("--report", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    max_replica = args.max_replica_kills if args.max_replica_kills is not None else max(1, round(args.rounds * 0.15))
    work = args.work or Path(tempfile.mkdtemp(prefix="longgrit-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    with private_cluster() as cluster:
        summary = run_chaos(cluster, work, args.rounds, args.seed, max_replica, args.new_shards)
    print_table(summary)
    report = args.report or work / "chaos.json"
    report.write_text(json.dumps(summary, indent=2))
    print(f"report: {report}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
