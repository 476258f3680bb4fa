"""What every `ray_jobs/<stage>.py` entry point does: join the cluster (or start a local Ray), then run the same
`prunekit <stage>` command the CLI runs, with the same flags and one-line errors.

    ray job submit --working-dir . -- python ray_jobs/knockout.py --config recipes/knockout.yaml [--set k=v ...]
"""
from __future__ import annotations

import argparse
import sys

from prunekit import PrunekitError


def main(command: str, argv: list[str] | None = None) -> int:
    from prunekit import cli
    from prunekit.distributed.cluster import connect, describe_cluster
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--address", default=None,
                     help="Ray cluster address (host:port or ray://host:port); default: the job's cluster (RAY_ADDRESS "
                          "under `ray job submit`), else the last `ray start` here, else a new local instance")
    known, rest = pre.parse_known_args(argv)
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps sub-commands here
    if command not in commands:
        print(f"prunekit {command}: error: this checkout has no `prunekit {command}` command", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        return cli.main([command, *rest])
    try:
        where = connect(known.address)
        print(f"prunekit {command}: Ray at {where}: {describe_cluster()}", flush=True)
    except PrunekitError as e:
        print(f"prunekit {command}: error: {e}", file=sys.stderr)
        return 2
    return cli.main([command, *rest])
