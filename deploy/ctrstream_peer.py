#!/usr/bin/env python3
"""ctrstream-peer: one process of a multi-process bytewax flow, in a Kubernetes StatefulSet pod.

    ctrstream-peer run join --addresses "NAME-0.SERVICE:2101;NAME-1.SERVICE:2101"

in pod NAME-1 (of StatefulSet NAME, headless Service SERVICE) runs ``ctrstream run join
--addresses ... --process-id 1``: the process id is the pod's ordinal, the number at the end
of its hostname (N below). Every pod gets the same arguments, so one StatefulSet template
serves all of them. Before it starts the flow:

* it checks the address list: the ordinal must be within it (replicas and the list agree),
  and address N must name this pod;
* when the flow's recovery directory does not exist yet (the pod's volume is new), it creates
  it holding only this pod's bytewax recovery partition, ``part-N`` of as many as there are
  processes. Each partition then lives on exactly one pod's volume: bytewax makes the pod that
  has a partition its writer, and on a restart the pods together have every partition again.
  (``ctrstream run`` alone would put all N partitions on every volume, and which copy is read
  would depend on bytewax's assignment, not on where the data is.);
* it waits (up to DNS_WAIT_S) until its own address resolves: bytewax binds to that name, and
  the headless Service publishes a pod's DNS record only shortly after the pod starts.

Installed in the image as /usr/local/bin/ctrstream-peer (deploy/Dockerfile); see
deploy/README.md, "Kubernetes".
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

DNS_WAIT_S = 120.0


class PeerError(RuntimeError):
    """The pod's name, the arguments or the address list do not fit together."""


def ordinal(hostname: str) -> int:
    """The StatefulSet ordinal at the end of a pod's hostname: ``ctrstream-join-1`` -> 1."""
    name, sep, number = hostname.split(".")[0].rpartition("-")
    if not sep or not name or not number.isdigit():
        raise PeerError(f"hostname {hostname!r} does not end in -N: ctrstream-peer derives the "
                        "process id from a StatefulSet pod's name")
    return int(number)


def plan(argv: list[str], hostname: str) -> tuple[list[str], argparse.Namespace, int, list[str]]:
    """The ``ctrstream`` arguments for this pod (``argv`` plus ``--process-id N``), the parsed
    arguments, N and the address list; raises PeerError when they do not fit together."""
    from ctrstream.cli import build_parser

    args = build_parser().parse_args(argv)  # a bad argv exits here with ctrstream's usage
    if args.command != "run":
        raise PeerError(f"expected `run FLOW --addresses ...`, got {' '.join(argv)!r}")
    if args.process_id is not None:
        raise PeerError("--process-id is derived from the pod's hostname: do not pass it")
    if args.processes != 1:
        raise PeerError("-p/--processes starts local processes: use replicas instead")
    if not args.addresses:
        raise PeerError("--addresses is required: 'NAME-0.SERVICE:PORT;NAME-1.SERVICE:PORT;...'")
    addresses = args.addresses.split(";")
    n = ordinal(hostname)
    if n >= len(addresses):
        raise PeerError(f"pod {hostname} is process {n}, but --addresses lists {len(addresses)} "
                        "processes: the StatefulSet's replicas and its address list disagree")
    host = addresses[n].rpartition(":")[0]
    if host.split(".")[0] != hostname.split(".")[0]:
        raise PeerError(f"address {n} is {addresses[n]!r}, which does not name this pod "
                        f"({hostname}): list the pods in ordinal order")
    return [*argv, "--process-id", str(n)], args, n, addresses


def own_partition(recovery_dir: str | os.PathLike, flow: str, index: int,
                  count: int) -> Path | None:
    """Create ``recovery_dir/flow`` holding only recovery partition ``index`` of ``count``;
    returns its path, or None when the directory exists (state from an earlier start)."""
    path = Path(recovery_dir) / flow
    if path.exists():
        return None
    from bytewax.recovery import init_db_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    # Made aside and renamed into place: a crash halfway leaves no directory that looks done.
    tmp = Path(tempfile.mkdtemp(prefix=f".{flow}-", dir=path.parent))
    try:
        init_db_dir(tmp, count)
        for p in tmp.iterdir():
            if p.name != f"part-{index}.sqlite3":
                p.unlink()
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def wait_resolvable(host: str, timeout_s: float = DNS_WAIT_S) -> bool:
    """Wait until ``host`` resolves; False if it still does not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hostname = os.environ.get("HOSTNAME") or socket.gethostname()
    from flows.config import ConfigError, load_config

    try:
        full, args, n, addresses = plan(argv, hostname)
        if args.recovery:
            cfg = load_config(args.config)
            made = own_partition(cfg.recovery_dir, args.flow, n, len(addresses))
            if made is not None:
                print(f"ctrstream-peer: created {made} with recovery partition {n} of "
                      f"{len(addresses)}", file=sys.stderr)
    except (PeerError, ConfigError) as e:
        print(f"ctrstream-peer: {e}", file=sys.stderr)
        return 2
    host = addresses[n].rpartition(":")[0]
    if not wait_resolvable(host):
        print(f"ctrstream-peer: {host} does not resolve after {DNS_WAIT_S:g} s (is the headless "
              "Service there, with publishNotReadyAddresses: true?); starting anyway",
              file=sys.stderr)
    print(f"ctrstream-peer: {hostname} is process {n} of {len(addresses)}", file=sys.stderr,
          flush=True)
    os.execvp("ctrstream", ["ctrstream", *full])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
