"""Two versions of `bloodcell serve` side by side: 64-image request throughput, alternating rounds.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_serve_ab.py /tmp/before/src src RUN_DIR IMAGE_FOLDER [--rounds 6]

This machine's speed drifts by tens of percent within minutes, so one benchmark run before a
change and one after can mislead. Here both servers (one per source tree) run at once, idle in
turn, and take alternating rounds of the same load; the medians and their ratio are what count.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from bench_serve import load, start_server
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import decode


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="source tree of the first version (its src/ folder)")
    parser.add_argument("after", help="source tree of the second version")
    parser.add_argument("run_dir")
    parser.add_argument("folder")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12, help="64-image requests per round")
    args = parser.parse_args()
    images = [p.read_bytes() for p in decode.find_images([args.folder])][:400]
    servers = {
        name: start_server(args.run_dir, tree) for name, tree in (("before", args.before), ("after", args.after))
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                result = asyncio.run(load(url, images, args.clients, 64, args.requests, 120))
                rates[name].append(result["images_per_s"])
                print(f"{name}: {result['images_per_s']:.0f} images/s, {result['errors']} errors", flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)
    before, after = (statistics.median(rates[name]) for name in ("before", "after"))
    print(f"\n{args.clients} clients x 64-image requests, {args.rounds} alternating rounds (median images/s):")
    print(f"before {before:.0f}, after {after:.0f}, ratio {after / before:.2f}")


if __name__ == "__main__":
    main()
