"""The join flow with and without the count features on one backlog, beside a Pathway peer.

For the same backlog (impressions and clicks already in the topics, 4 partitions), each run is
`ctrstream run join --until-eof` with recovery on (5 s epochs), on a private broker and Redis:
features off and on, on 1 and 2 processes (`-p`), the counters in 1 and 16 shards. Printed
per run: input events/s (wall time, start-up included), input events per CPU-second of the
flow's processes (user + system of everything the run started), and at `-p 2` the share of
the counter signals the busier process handled (1.0: one process counts everything). Beside
them the peer: the same five-entity windowed counts in Pathway, written to the same Redis
(bench/peers/pathway_counts.py, in .venv/peers, which `make bench` makes; `make test` never
installs Pathway).

    python bench/pipeline.py [--impressions 300000] [--quick] [--json]
    python bench/pipeline.py --quick --compare OTHER_TREE [--rounds 3]

--quick: a 40k-impression backlog, no peer, under 3 minutes. --json: one JSON object printed
last with ``off_eps_p1``, ``on_eps_p1``, ``on_eps_per_cpu_s_p1``, ``on_eps_per_cpu_s_p2``,
``signal_share_p2`` (the larger process's share, 16 shards), ``peer_eps`` (null without
Pathway) and every run's figures.

--compare: for an A/B of a change, the features-on runs (-p 1 and -p 2) of this tree and of
another checkout, alternated on the same backlog, in CPU seconds.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.produce import fresh_topics  # noqa: E402
from ctrstream.produce import produce  # noqa: E402
from ctrstream.simulator import StreamSpec  # noqa: E402
from ctrstream.stack import LocalStack, create_topics, free_port  # noqa: E402
from flows.config import Config  # noqa: E402

# (name, features on, processes, shards)
RUNS = [("off_p1", False, 1, 16), ("on_p1", True, 1, 16), ("on_p1_s1", True, 1, 1),
        ("off_p2", False, 2, 16), ("on_p2", True, 2, 16), ("on_p2_s1", True, 2, 1)]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_flow(cfg: Config, tmp: Path, name: str, features: bool, processes: int,
             shards: int, tree: Path = ROOT) -> dict:
    """One `ctrstream run join --until-eof` over the backlog, with the code of ``tree`` (a
    checkout of this repository): wall s, CPU s and the counter signals per process."""
    run_cfg = cfg.replace(kafka={"examples_topic": f"bench-out-{uuid.uuid4().hex[:6]}"},
                          data_dir=str(tmp / name / "data"),
                          recovery_dir=str(tmp / name / "recovery"),
                          features={"enabled": features, "shards": shards,
                                    "store_prefix": f"f{name}"})
    create_topics(run_cfg)
    path = tmp / f"{name}.toml"
    path.write_text(run_cfg.to_toml())
    cpu0, t0 = _cpu_children(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ctrstream.cli", "--config", str(path), "run",
                          "join", "--until-eof", "-p", str(processes)],
                         cwd=tree, capture_output=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-3000:])
    signals = [orjson.loads(f.read_bytes())["signals"]
               for f in (Path(run_cfg.data_dir) / "join").glob("counters-*.json")]
    return {"wall_s": wall, "cpu_s": cpu, "signals": signals}


PEERS_PYTHON = ROOT / ".venv" / "peers" / "bin" / "python"  # made by `make bench`


def run_peer(cfg: Config, tmp: Path, n_events: int) -> dict | None:
    """The Pathway peer over the same topics and Redis, or None without its virtualenv."""
    if not PEERS_PYTHON.exists():
        return None
    path = tmp / "peer.toml"
    path.write_text(cfg.replace(features={"store_prefix": "fpeer"}).to_toml())
    cpu0, t0 = _cpu_children(), time.perf_counter()
    out = subprocess.run([str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "pathway_counts.py"),
                          str(path), str(n_events)], cwd=ROOT, capture_output=True, timeout=900)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-3000:])
    return {"wall_s": wall, "cpu_s": cpu, "signals": []}


def compare(cfg: Config, tmp: Path, other: Path, rounds: int) -> None:
    """Features on, 16 shards, -p 1 and -p 2, this tree's code against ``other``'s, alternated
    ``rounds`` times on the same backlog: the CPU seconds of each run (steadier than wall
    time on a loaded machine)."""
    cpu: dict[str, list[float]] = {}
    for r in range(rounds):
        for label, tree in (("this", ROOT), ("other", other)):
            for p in (1, 2):
                name = f"{label}_p{p}"
                got = run_flow(cfg, tmp, f"{name}_{r}", True, p, 16, tree)
                cpu.setdefault(name, []).append(got["cpu_s"])
    print(f"flow CPU s, features on, 16 shards, alternated {rounds}x; other = {other}")
    for name, runs in cpu.items():
        print(f"    {name:<9} " + " ".join(f"{c:5.2f}" for c in runs)
              + f"   median {sorted(runs)[len(runs) // 2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, default=300_000)
    ap.add_argument("--quick", action="store_true", help="a 40k-impression backlog")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--compare", type=Path, metavar="TREE",
                    help="instead: this tree against another checkout (e.g. `git worktree "
                         "add` or `git archive | tar -x`), alternated")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare")
    args = ap.parse_args()
    if args.compare is not None and not (args.compare / "flows" / "join.py").exists():
        ap.error(f"--compare {args.compare}: not a checkout of this repository")
    n_imp = 40_000 if args.quick else args.impressions
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stack = LocalStack(tmp / "stack", free_port(), free_port())
        stack.up()
        try:
            cfg = fresh_topics(stack.config(Config()), "bench")
            manifest = produce(cfg, StreamSpec(seed=3, impressions=n_imp))
            c = manifest["counts"]
            n = c["impression_messages"] + c["click_messages"]
            if args.compare is not None:
                return compare(cfg, tmp, args.compare.resolve(), args.rounds)
            results = {name: run_flow(cfg, tmp, name, *rest) for name, *rest in RUNS}
            # Pathway's Kafka reader took ~14 messages per 100 ms step on this broker (5,139
            # in 28 s): too slow for --quick's three minutes.
            peer = None if args.quick else run_peer(cfg, tmp, n)
        finally:
            stack.down()
    print(f"join flow over a backlog of {n:,} input events ({n_imp:,} impressions), "
          f"{cfg.kafka.partitions} partitions, recovery on; one run each")
    print(f"    {'run':<28} {'events/s':>10} {'events/CPU-s':>13} {'wall s':>7} {'CPU s':>6}"
          f" {'signal share':>13}")
    figures = {}
    labels = {"off_p1": "features off, -p 1", "on_p1": "features on, -p 1, 16 shards",
              "on_p1_s1": "features on, -p 1, 1 shard", "off_p2": "features off, -p 2",
              "on_p2": "features on, -p 2, 16 shards", "on_p2_s1": "features on, -p 2, 1 shard",
              "peer": "Pathway peer, counts only"}
    for name, r in [*results.items(), *([("peer", peer)] if peer else [])]:
        eps, per_cpu = n / r["wall_s"], n / r["cpu_s"]
        share = max(r["signals"]) / sum(r["signals"]) if sum(r["signals"]) else None
        figures[name] = {"eps": eps, "eps_per_cpu_s": per_cpu, "wall_s": r["wall_s"],
                         "cpu_s": r["cpu_s"], "signal_share": share}
        print(f"    {labels[name]:<28} {eps:>10,.0f} {per_cpu:>13,.0f} {r['wall_s']:>7.1f}"
              f" {r['cpu_s']:>6.1f} {'-' if share is None else f'{share:.2f}':>13}")
    f = figures
    print(f"    features on / off at -p 1: {f['on_p1']['eps'] / f['off_p1']['eps']:.2f} "
          f"(events/s); on at -p 2 / -p 1: "
          f"{f['on_p2']['eps_per_cpu_s'] / f['on_p1']['eps_per_cpu_s']:.2f} (events/CPU-s)")
    if peer is None:
        print("    (no Pathway peer: not in --quick; `make bench` makes .venv/peers with it)")
    if args.json:
        print(orjson.dumps({
            "events": n, "off_eps_p1": f["off_p1"]["eps"], "on_eps_p1": f["on_p1"]["eps"],
            "on_eps_per_cpu_s_p1": f["on_p1"]["eps_per_cpu_s"],
            "on_eps_per_cpu_s_p2": f["on_p2"]["eps_per_cpu_s"],
            "signal_share_p2": f["on_p2"]["signal_share"],
            "peer_eps": f["peer"]["eps"] if peer else None, "runs": figures}).decode())


if __name__ == "__main__":
    main()
