"""Benchmark: prolog and epilog as SLURM runs them, with 0 and with N other jobs on the node.

Runs the real `prolog` and `epilog` executables (as slurmd would: no PATH, SLURM env) inside
the sandbox node (tests/topology.py), through netacct-daemon and without it (the fallback),
reports medians: 0-job blocks and N-job blocks in turn (N jobs loaded, then unloaded, for
each of --rounds), over all pairs of each kind and each N-job block compared with the 0-job
blocks either side (a VM's speed drifts by more than the effect in a minute); reads every
running job's counters with N jobs loaded; and, with --cycles, runs that many prolog/epilog
pairs through the daemon, recording its RSS, open descriptors and threads every cycles/10
pairs.
    .venv/bin/python bench/hooks.py [--jobs 1000] [--runs 50] [--rounds 8] [--cycles 10000] [--engine cgroup]
With --engine cgroup the hooks are the cgroup engine's (its own cgroup per job, under a
subtree of the run's own in the unified hierarchy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from topology import UPLINK, Topology  # noqa: E402


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def usage(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, open descriptors, threads) of a process."""
    return rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


class Bench:
    def __init__(self, topo: Topology, work: Path, counting: str = "bpf", engine: str = "netns") -> None:
        self.topo = topo
        self.work = work
        self.cfg = work / "netacct.toml"
        self.cg_root = Path("/sys/fs/cgroup/unified") / f"{topo.tag}cg"
        cgroup = f'engine = "cgroup"\n[cgroup]\nmode = "own"\nroot = "{self.cg_root}"\n' if engine == "cgroup" else ""
        self.cfg.write_text(f'uplink = "{UPLINK}"\nnetns_prefix = "{topo.tag}j-"\ndb = "{work}/n.db"\n'
                            f'log_file = "{work}/netacct.log"\nbpffs = "{topo.bpffs}"\n'
                            f'counting = "{counting}"\n{cgroup}')
        self.sock = work / "daemon.sock"
        self.daemon: subprocess.Popen[str] | None = None

    def remove_cgroups(self) -> None:
        """The cgroup engine's subtree of this run (its jobs' cgroups are gone by now: empty)."""
        from slurm_netacct.kernel.cgroup import remove_tree

        remove_tree(self.cg_root)

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen([str(ROOT / ".venv/bin/netacct-daemon"), "--config", str(self.cfg),
                                        "--socket", str(self.sock)], stdout=subprocess.PIPE, text=True)
        assert self.daemon.stdout is not None
        self.daemon.stdout.readline()

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            self.daemon.wait(timeout=120)
            self.daemon = None

    def settle(self) -> None:
        """Wait until the service has done its deferred work (deleting links, freeing addresses)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(300)
            c.connect(str(self.sock))
            c.sendall(b"netacct/1\0flush\0\0")
            if not c.recv(64).startswith(b"0"):
                raise SystemExit("netacct-daemon: flush failed")

    def hook(self, which: str, job: int) -> float:
        env = {"NETACCT_CONFIG": str(self.cfg), "NETACCT_SOCKET": str(self.sock), "SLURM_JOB_ID": str(job),
               "SLURMD_NODENAME": "n1", "SLURM_JOB_USER": "bench", "SLURM_JOB_UID": "1000"}
        t0 = time.perf_counter()
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.topo.node}", str(ROOT / which)], env=env,
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{which} {job}: {r.stderr}")
        return dt

    def block(self, first: int, n: int, gap: float, pool: tuple[list[float], list[float]]) -> tuple[float, float]:
        """A timed block: pairs(), once the service has done the deferred work (link deletions)
        of the hooks before it, so that one block's leftovers are not timed in the next. Every
        prolog and epilog time (ms) is also added to pool."""
        self.settle()
        return self.pairs(first, n, gap, pool)

    def pairs(self, first: int, n: int, gap: float = 0.0,
              pool: tuple[list[float], list[float]] | None = None) -> tuple[float, float]:
        """Medians (ms) of n prolog/epilog pairs; `gap` seconds of quiet before each hook."""
        pro, epi = [], []
        for j in range(first, first + n):
            time.sleep(gap)
            pro.append(self.hook("prolog", j) * 1e3)
            time.sleep(gap)
            epi.append(self.hook("epilog", j) * 1e3)
        if pool is not None:
            pool[0].extend(pro)
            pool[1].extend(epi)
        return statistics.median(pro), statistics.median(epi)

    def read_all_ms(self) -> float:
        code = ("import sys, time, statistics; from pathlib import Path; "
                "from slurm_netacct import config; from slurm_netacct.node import sample; from slurm_netacct.kernel import netns; "
                f"netns.setns(Path('/run/netns/{self.topo.node}')); cfg = config.load('{self.cfg}'); "
                "ts = []\n"
                "for _ in range(5):\n"
                "    t = time.perf_counter(); r = sample.read_live(cfg, 'n1'); ts.append(time.perf_counter() - t)\n"
                "print(statistics.median(ts) * 1e3, len(r.traffic))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        print(f"  read {out[1]} jobs' counters", flush=True)
        return float(out[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000, help="other jobs on the node for the loaded runs")
    ap.add_argument("--runs", type=int, default=50, help="prolog/epilog pairs per measurement")
    ap.add_argument("--rounds", type=int, default=8,
                    help="load/unload rounds (each N-job block is compared with the 0-job blocks either side)")
    ap.add_argument("--cycles", type=int, default=0, help="daemon memory run: this many pairs")
    ap.add_argument("--gap", type=float, default=0.0,
                    help="seconds between hooks in the timed runs (0: back to back, the worst case; "
                         "the service's deferred link deletions then overlap the next hook)")
    ap.add_argument("--counting", choices=["bpf", "netfilter"], default="bpf",
                    help="the way of counting (config `counting`; netfilter: nftables)")
    ap.add_argument("--engine", choices=["netns", "cgroup"], default="netns",
                    help="the accounting engine (config `engine`; cgroup counts with bpf)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tag = f"hb{os.getpid() % 10000}-"
    work = Path(tempfile.mkdtemp(prefix="netacct-bench-hooks-"))
    topo = Topology(tag).up()
    b = Bench(topo, work, args.counting, args.engine)
    res: dict[str, float | list[float] | list[tuple[int, int]]] = {}
    try:
        res["fallback_prolog_ms"], res["fallback_epilog_ms"] = b.pairs(1, max(5, args.runs // 5))
        print(f"without daemon, 0 other jobs: prolog {res['fallback_prolog_ms']:.1f} ms, epilog {res['fallback_epilog_ms']:.1f} ms", flush=True)
        b.start_daemon()
        b.pairs(100, 5)  # warm-up
        # Rounds of: 0-job block, load N jobs, N-job block, unload; and a last 0-job block.
        # Each N-job block is compared with the mean of the 0-job blocks either side of it,
        # so that the machine's drift during the ~15 s of loading hits both alike.
        first = iter(range(1000, 100_000, args.runs))  # each timed block's own job ids
        pool0: tuple[list[float], list[float]] = ([], [])  # every prolog and epilog time, 0 jobs
        poolN: tuple[list[float], list[float]] = ([], [])  # and N jobs
        zero: list[tuple[float, float]] = [b.block(next(first), args.runs, args.gap, pool0)]
        loaded: list[tuple[float, float]] = []
        reads: list[float] = []
        for r in range(args.rounds):
            print(f"round {r + 1}: daemon, 0 other jobs: prolog {zero[-1][0]:.1f} ms, epilog {zero[-1][1]:.1f} ms",
                  flush=True)
            t0 = time.perf_counter()
            for j in range(100_000, 100_000 + args.jobs):
                b.hook("prolog", j)
            print(f"round {r + 1}: loaded {args.jobs} jobs in {time.perf_counter() - t0:.1f} s", flush=True)
            loaded.append(b.block(next(first), args.runs, args.gap, poolN))
            print(f"round {r + 1}: daemon, {args.jobs} other jobs: prolog {loaded[-1][0]:.1f} ms, "
                  f"epilog {loaded[-1][1]:.1f} ms", flush=True)
            reads.append(b.read_all_ms())
            print(f"round {r + 1}: reading every running job's counters ({args.jobs}): {reads[-1]:.1f} ms", flush=True)
            for j in range(100_000, 100_000 + args.jobs):
                b.hook("epilog", j)
            zero.append(b.block(next(first), args.runs, args.gap, pool0))
        print(f"after the last round: daemon, 0 other jobs: prolog {zero[-1][0]:.1f} ms, epilog {zero[-1][1]:.1f} ms",
              flush=True)
        ratios = [(n[0] / ((a[0] + z[0]) / 2), n[1] / ((a[1] + z[1]) / 2))
                  for n, a, z in zip(loaded, zero, zero[1:])]
        res["prolog0_ms"] = statistics.median(pool0[0])
        res["epilog0_ms"] = statistics.median(pool0[1])
        res["prologN_ms"] = statistics.median(poolN[0])
        res["epilogN_ms"] = statistics.median(poolN[1])
        res["prolog_ratios"] = [round(x[0], 3) for x in ratios]
        res["epilog_ratios"] = [round(x[1], 3) for x in ratios]
        res["read_all_ms"] = statistics.median(reads)
        print(f"daemon, 0 other jobs (median of all {len(pool0[0])} pairs): prolog {res['prolog0_ms']:.1f} ms, "
              f"epilog {res['epilog0_ms']:.1f} ms", flush=True)
        print(f"daemon, {args.jobs} other jobs (median of all {len(poolN[0])} pairs): prolog "
              f"{res['prologN_ms']:.1f} ms ({res['prologN_ms'] / res['prolog0_ms']:.2f}×), "
              f"epilog {res['epilogN_ms']:.1f} ms ({res['epilogN_ms'] / res['epilog0_ms']:.2f}×)", flush=True)
        print(f"{args.jobs}-job block ÷ mean of the 0-job blocks either side, per round: prolog "
              f"{', '.join(f'{x:.2f}' for x in res['prolog_ratios'])}; epilog "
              f"{', '.join(f'{x:.2f}' for x in res['epilog_ratios'])}", flush=True)
        print(f"reading every running job's counters ({args.jobs}, median of {len(reads)}): "
              f"{res['read_all_ms']:.1f} ms", flush=True)
        if args.cycles and b.daemon is not None:
            samples: list[tuple[int, int, int, int]] = [(0, *usage(b.daemon.pid))]
            print(f"  after 0 jobs: daemon RSS {samples[-1][1]} KiB, {samples[-1][2]} fds, "
                  f"{samples[-1][3]} threads", flush=True)
            step = max(1, args.cycles // 10)
            for k in range(0, args.cycles, step):
                n = min(step, args.cycles - k)
                b.pairs(200_000 + k, n)
                samples.append((k + n, *usage(b.daemon.pid)))
                print(f"  after {k + n} jobs: daemon RSS {samples[-1][1]} KiB, {samples[-1][2]} fds, "
                      f"{samples[-1][3]} threads", flush=True)
            res["rss_kib"] = [(jobs, rss) for jobs, rss, _, _ in samples]
            res["fds"] = [(jobs, fds) for jobs, _, fds, _ in samples]
    finally:
        try:
            b.stop_daemon()
        finally:
            topo.down()
            b.remove_cgroups()
        # Job namespaces a failed run left behind (their links went with the node): this run's only.
        for left in Path("/run/netns").glob(f"{tag}*"):
            subprocess.run(["ip", "netns", "del", left.name], check=False)
        shutil.rmtree(work, ignore_errors=True)  # config, node database, log, socket
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
