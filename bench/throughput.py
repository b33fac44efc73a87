"""Benchmark: a job's single-stream TCP throughput with N other jobs' accounting loaded.

Measures, in the hermetic sandbox (tests/topology.py), with iperf3 to the LAN server (from it
with --download):
  bare      the node itself, no job namespace (the baseline)
  job/0     one accounted job, no other job on the node
  job/N     the same job with N other jobs set up on the node
  job/0 rps a second job set up with `rps_cpus` (with --rps-cpus MASK; not for cgroup)
for each backend (the namespace engine's ways of counting, and `cgroup`: the cgroup engine,
its own cgroup per job under a subtree of the run's own), and reports the ratios. First, side
by side: the bare node and one job of each engine (the cgroup engine and the first of the
namespace engine's ways given), measured in turn (bare, job, job, bare, ...), so that all ratios
share one baseline and one stretch of the machine's time; with --detached also a cgroup job whose programs are detached
(the same cgroup placement, no counting: what the programs themselves cost). Then, per backend
(unless --jobs 0), the N-job runs above. Run as root:
    .venv/bin/python bench/throughput.py --jobs 1000 [--rps-cpus 1] [--download]
    .venv/bin/python bench/throughput.py --backends bpf,cgroup --jobs 0 --detached --reps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from topology import LAN4, UPLINK, Topology  # noqa: E402

from slurm_netacct import config  # noqa: E402
from slurm_netacct.kernel.cgroup import remove_tree  # noqa: E402
from slurm_netacct.node import lifecycle  # noqa: E402
from slurm_netacct.store import db as store  # noqa: E402
from slurm_netacct.log import setup as setup_log  # noqa: E402

IPERF_PORT = 5201


REVERSE: list[str] = []  # ["-R"] with --download: the server sends, the job receives


def iperf(argv_prefix: list[str], seconds: int) -> float:
    """One iperf3 run from wherever argv_prefix puts it; received bits per second."""
    out = subprocess.run([*argv_prefix, "iperf3", "-c", LAN4, "-p", str(IPERF_PORT), "-t", str(seconds),
                          "-J", *REVERSE], capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def measure(argv_prefix: list[str], seconds: int, reps: int) -> float:
    return statistics.median(iperf(argv_prefix, seconds) for _ in range(reps))


def alternating_runs(prefixes: list[list[str]], seconds: int, reps: int) -> list[list[float]]:
    """Each prefix's runs, measured in turn (a, b, c, a, b, c, ...): slow drifts of a shared
    machine hit all alike."""
    runs: list[list[float]] = [[] for _ in prefixes]
    for _ in range(reps):
        for i, prefix in enumerate(prefixes):
            runs[i].append(iperf(prefix, seconds))
    return runs


def alternating(prefixes: list[list[str]], seconds: int, reps: int) -> list[float]:
    """Medians of each prefix's runs, measured in turn."""
    return [statistics.median(r) for r in alternating_runs(prefixes, seconds, reps)]


def paired(runs: dict[str, list[float]], name: str) -> float:
    """Median over the rounds of name's run ÷ the bare run just before it (the same round)."""
    return statistics.median(j / b for j, b in zip(runs[name], runs["bare"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000, help="other jobs loaded on the node")
    ap.add_argument("--backends", default="bpf,nftables,iptables",
                    help="ways of counting: bpf (the default), nftables, iptables (netfilter), "
                         "cgroup (the cgroup engine)")
    ap.add_argument("--seconds", type=int, default=3, help="length of one iperf3 run (whole seconds, >= 1)")
    ap.add_argument("--reps", type=int, default=5, help="runs per point (median reported)")
    ap.add_argument("--rps-cpus", default="",
                    help="also measure a job set up with this rps_cpus setting (a hex CPU mask, e.g. 1), alternating")
    ap.add_argument("--download", action="store_true",
                    help="the LAN server sends and the job (or the bare node) receives (iperf3 -R)")
    ap.add_argument("--detached", action="store_true",
                    help="side by side, also a cgroup job with its programs detached (needs cgroup in --backends)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.seconds < 1:  # iperf3 -t 0 means "forever"
        ap.error("--seconds must be at least 1")
    if args.jobs < 0 or args.reps < 1:
        ap.error("--jobs must be at least 0 and --reps at least 1")
    backends = args.backends.split(",")
    if args.detached and "cgroup" not in backends:
        ap.error("--detached needs the cgroup backend in --backends")
    if args.download:
        REVERSE.append("-R")

    tag = f"bt{os.getpid() % 10000}-"
    cg_root = Path("/sys/fs/cgroup/unified") / f"{tag}cg"  # the cgroup engine's, this run's own
    work = Path(tempfile.mkdtemp(prefix="netacct-bench-"))
    topo = Topology(tag).up()
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.lan}", "iperf3", "-s", "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    results: dict[str, dict[str, float]] = {}
    side: dict[str, float] = {}
    side_runs: dict[str, list[float]] = {}
    try:
        cfgs: dict[str, Path] = {}
        for backend in backends:
            cfgp = cfgs[backend] = work / f"{backend}.toml"
            how = ('counting = "bpf"\nfirewall = "nftables"\n' if backend == "bpf"
                   else 'engine = "cgroup"\n' if backend == "cgroup"
                   else f'counting = "netfilter"\nfirewall = "{backend}"\n')
            cgroup = f'[cgroup]\nmode = "own"\nroot = "{cg_root}"\n' if backend == "cgroup" else ""
            cfgp.write_text(f'uplink = "{UPLINK}"\nnetns_prefix = "{tag}{backend[:3]}-"\n'
                            f'db = "{work}/{backend}.db"\nlog_file = "{work}/{backend}.log"\n'
                            f'bpffs = "{topo.bpffs}"\n{how}{cgroup}')
        in_node(topo, work, "side", lambda: side_by_side(cfgs, args))
        side = json.loads((work / "side.json").read_text())
        side_runs = json.loads((work / "side-runs.json").read_text())
        for backend, cfgp in (cfgs.items() if args.jobs else ()):
            results[backend] = in_node(topo, work, backend, functools.partial(run_backend, cfgp, args))
    finally:
        server.terminate()
        server.wait(timeout=10)
        topo.down()
        # Job namespaces a failed run left behind (their links went with the node): this run's only.
        for left in Path("/run/netns").glob(f"{tag}*"):
            subprocess.run(["ip", "netns", "del", left.name], check=False)
        remove_tree(cg_root)  # the cgroup engine's subtree (its jobs' cgroups are gone: empty)
        shutil.rmtree(work, ignore_errors=True)  # configs, logs and databases of this run
    n = args.jobs
    print()
    jobs = [k for k in side if k != "bare"]
    print("| side by side | " + " | ".join(side) + " | " + " | ".join(f"{k} ÷ bare (paired)" for k in jobs) + " |")
    print("|---|" + "---|" * (2 * len(side) - 1))
    print(f"| Gbit/s (medians of {args.reps}) | " + " | ".join(f"{v / 1e9:.2f}" for v in side.values()) + " | "
          + " | ".join(f"{side[k] / side['bare']:.3f} ({paired(side_runs, k):.3f})" for k in jobs) + " |")
    print("(paired: the median over the rounds of the job's run ÷ the bare run of the same round)")
    record = {"jobs": args.jobs, "side_by_side": side, "side_by_side_runs": side_runs,
              "side_by_side_paired": {k: paired(side_runs, k) for k in jobs}, "results": results}
    if args.json and not results:
        args.json.write_text(json.dumps(record, indent=2))
    if not results:
        return 0
    print()
    rps = " job/0 rps Gbit/s | job/0 rps ÷ bare |" if args.rps_cpus else ""
    print(f"| backend | bare Gbit/s | job/0 Gbit/s | job/{n} Gbit/s | job/0 ÷ bare | job/{n} ÷ job/0 |{rps} "
          f"read all {n + 1} ms |")
    print("|---|---|---|---|---|---|" + ("---|---|" if rps else "") + "---|")
    for b, r in results.items():
        j0 = (r["job0"] + r["job0_after"]) / 2
        extra = (f" {r['job0_rps'] / 1e9:.2f} | {r['job0_rps'] / r['bare']:.3f} |" if "job0_rps" in r
                 else " – | – |") if rps else ""
        print(f"| {b} | {r['bare'] / 1e9:.2f} | {j0 / 1e9:.2f} | {r['jobN'] / 1e9:.2f} | "
              f"{r['job0'] / r['bare']:.3f} | {r['jobN'] / j0:.3f} |{extra} {r['read_all_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def in_node(topo: Topology, work: Path, name: str, body: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run body in a child inside the sandbox node (the node side of setup must happen there:
    the child joins it for good); its result is also left in <work>/<name>.json."""
    pid = os.fork()
    if pid == 0:
        try:
            from slurm_netacct.kernel.netns import setns
            setns(Path(f"/run/netns/{topo.node}"))
            (work / f"{name}.json").write_text(json.dumps(body()))
        except BaseException:  # noqa: BLE001 - the child must not unwind into the parent's clean-up
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"{name} run failed")
    return dict(json.loads((work / f"{name}.json").read_text()))


def exec_prefix(cfg_path: Path, job: int) -> list[str]:
    """Run a command in the job (its namespace, or its cgroup) of the configuration cfg_path."""
    return ["env", f"NETACCT_CONFIG={cfg_path}", str(ROOT / ".venv/bin/netacct-exec"), "--job", str(job), "--"]


def detach_programs(cfg: config.Config, job: int) -> None:
    """Detach the cgroup engine's programs from the job's own cgroup (they stay pinned; the
    teardown finds nothing to detach and goes on)."""
    from slurm_netacct import naming
    from slurm_netacct.counting.cgroup import root
    from slurm_netacct.kernel import bpf, cgroup

    where = naming.job_cgroup(root(cfg), naming.netns_name(cfg.netns_prefix, job))
    for direction, ids in cgroup.attached(where).items():
        for prog_id in ids:
            fd = bpf.prog_fd_by_id(prog_id)
            try:
                cgroup.detach(where, {direction: fd})
            finally:
                os.close(fd)
    assert not any(cgroup.attached(where).values()), where


def side_by_side(cfgs: dict[str, Path], args: argparse.Namespace) -> dict[str, float]:
    """Runs inside the sandbox node: the bare node and one job of every backend (and with
    --detached a cgroup job without its programs), in turn; medians (bits/s) by name."""
    job, detached = 1, 2
    # The namespace engine's ways of counting would give their jobs the same address of the
    # same pool, each with its own database: only the first of them (and the cgroup engine).
    netns_ways = [b for b in cfgs if b != "cgroup"][1:]
    loaded = {b: config.load(p) for b, p in cfgs.items() if b not in netns_ways}
    setup_log(next(iter(loaded.values())).log_file, "bench")
    names, prefixes = ["bare"], [[]]  # this process is in the node: [] is the bare node
    made: list[tuple[config.Config, int]] = []
    try:
        for b, cfg in loaded.items():
            lifecycle.setup_job(cfg, store.JobInfo(job_id=job, node="bench"))
            made.append((cfg, job))
            names.append(b)
            prefixes.append(exec_prefix(cfgs[b], job))
        if args.detached:
            cfg = loaded["cgroup"]
            lifecycle.setup_job(cfg, store.JobInfo(job_id=detached, node="bench"))
            made.append((cfg, detached))
            detach_programs(cfg, detached)
            names.append("cgroup-detached")
            prefixes.append(exec_prefix(cfgs["cgroup"], detached))
        runs = dict(zip(names, alternating_runs(prefixes, args.seconds, args.reps)))
    finally:
        for cfg, j in made:
            lifecycle.teardown_job(cfg, store.JobInfo(job_id=j, node="bench"))
    out = {k: statistics.median(v) for k, v in runs.items()}
    print("side by side (alternating runs): " + ", ".join(
        f"{k} {v / 1e9:.2f} Gbit/s" + ("" if k == "bare" else f" ({v / out['bare']:.3f}; paired {paired(runs, k):.3f})")
        for k, v in out.items()), flush=True)
    (Path(cfgs[names[1]]).parent / "side-runs.json").write_text(json.dumps(runs))
    return out


def run_backend(cfg_path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Runs inside the sandbox node: bare vs job/0 (alternating), load N jobs, job/N, read
    all counters, unload, job/0 again; tear all down."""
    cfg = config.load(cfg_path)
    setup_log(cfg.log_file, "bench")
    measured = 1
    lifecycle.setup_job(cfg, store.JobInfo(job_id=measured, node="bench"))
    def in_job(job: int) -> list[str]:
        return [str(ROOT / ".venv/bin/netacct-exec"), "--job", str(job), "--"]

    job_prefix = in_job(measured)
    os.environ["NETACCT_CONFIG"] = str(cfg_path)
    prefixes = [[], job_prefix]  # this process is in the node: [] is the bare node
    rps_job, mask_file = 2, Path("/proc/sys/net/core/rps_default_mask")
    mask_before = mask_file.read_text().strip()
    label = "cgroup" if cfg.engine == "cgroup" else f"{cfg.counting}/{cfg.firewall}"
    if args.rps_cpus and cfg.engine != "cgroup":  # the same job again, its link made with rps_cpus (new links only)
        lifecycle.setup_job(dataclasses.replace(cfg, rps_cpus=args.rps_cpus),
                            store.JobInfo(job_id=rps_job, node="bench"))
        prefixes.append(in_job(rps_job))
    bare, job0, *rps = alternating(prefixes, args.seconds, args.reps)
    print(f"{label}: bare {bare / 1e9:.2f} Gbit/s, job/0 {job0 / 1e9:.2f} Gbit/s"
          + (f", job/0 with rps_cpus={args.rps_cpus} {rps[0] / 1e9:.2f} Gbit/s" if rps else "")
          + " (alternating runs)", flush=True)
    if rps:
        lifecycle.teardown_job(cfg, store.JobInfo(job_id=rps_job, node="bench"))
        mask_file.write_text(mask_before)  # jobs made from here on: without rps, as job 1
    t0 = time.perf_counter()
    others = range(100000, 100000 + args.jobs)
    for j in others:
        lifecycle.setup_job(cfg, store.JobInfo(job_id=j, node="bench"))
    t_setup = time.perf_counter() - t0
    jobn = measure(job_prefix, args.seconds, args.reps)
    print(f"{label}: job/{args.jobs} {jobn / 1e9:.2f} Gbit/s (loading took {t_setup:.1f} s)", flush=True)
    from slurm_netacct.node import sample
    reads, samples = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        live = sample.read_live(cfg, "bench")
        reads.append(time.perf_counter() - t0)
        assert len(live.traffic) == args.jobs + 1, (len(live.traffic), live.failures)
        t0 = time.perf_counter()
        stored = sample.sample_node(cfg, "bench")
        samples.append(time.perf_counter() - t0)
        assert stored.sampled == args.jobs + 1
    read_ms, sample_ms = statistics.median(reads) * 1e3, statistics.median(samples) * 1e3
    print(f"{label}: reading all {args.jobs + 1} jobs' counters {read_ms:.1f} ms, "
          f"sampling them into the database {sample_ms:.1f} ms (medians of 5)", flush=True)
    t0 = time.perf_counter()
    for j in others:
        lifecycle.teardown_job(cfg, store.JobInfo(job_id=j, node="bench"))
    t_down = time.perf_counter() - t0
    job0_after = measure(job_prefix, args.seconds, args.reps)
    print(f"{label}: job/0 again {job0_after / 1e9:.2f} Gbit/s", flush=True)
    lifecycle.teardown_job(cfg, store.JobInfo(job_id=measured, node="bench"))
    return {"bare": bare, "job0": job0, "job0_after": job0_after, "jobN": jobn, "setup_s": t_setup,
            "teardown_s": t_down, "read_all_ms": read_ms, "sample_all_ms": sample_ms,
            **({"job0_rps": rps[0]} if rps else {})}


if __name__ == "__main__":
    sys.exit(main())
