"""Time every form's kernels in this checkout, or compare two such timings: a check that a change
to the back half leaves the kernels as fast as they were.

    # in each checkout (its own .venv and ATTNDSL_CACHE_DIR), alternating, a few rounds each:
    .venv/bin/python tools/compare_kernels.py time --lengths 1024,4096 --rounds 5 > /tmp/a_1.json
    # then, anywhere:
    python tools/compare_kernels.py compare "/tmp/a_*.json" "/tmp/b_*.json"

`time` prints {"form|N|fwd" or "form|N|fwd+bwd": median ms} for one spec per form (B·H = 8,
M = D = 64, default knobs: tuned=False, so tuning records do not differ between checkouts);
`compare` prints, per entry, the median over the files of each side and the ratio b / a.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import time

SPECS = {
    "prefix_sum": "kernel = elu1; mask = causal",
    "linear": "kernel = elu1",
    "decayed": "kernel = elu1; position = alibi; mask = causal",
    "banded": "kernel = elu1; position = toeplitz(max_distance=128); mask = causal",
    "toeplitz_fft": "kernel = elu1; position = toeplitz(max_distance=4096, init=normal)",
    "quadratic": "mask = causal",
    "quadratic_table": "position = toeplitz(max_distance=64, init=normal)",
    "kde": "sampling = kde(buckets=32, block=128, samples=128, seed=0)",
}


def time_forms(lengths: list[int], rounds: int) -> dict[str, float]:
    import torch

    import attndsl
    out = {}
    torch.manual_seed(0)
    for form, body in SPECS.items():
        attn = attndsl.compile(f"attention t {{ {body} }}", heads=8, head_dim=64, tuned=False)
        for n in lengths:
            q, k, v = (torch.randn(1, 8, n, 64) * 0.5 for _ in range(3))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            attn(q, k, v)
            attn(qg, kg, vg).sum().backward()
            fwd, both = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                attn(q, k, v)
                fwd.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                attn(qg, kg, vg).sum().backward()
                both.append(time.perf_counter() - t0)
            out[f"{form}|{n}|fwd"] = 1e3 * statistics.median(fwd)
            out[f"{form}|{n}|fwd+bwd"] = 1e3 * statistics.median(both)
    return out


def compare(a_glob: str, b_glob: str) -> str:
    a = [json.load(open(p)) for p in sorted(glob.glob(a_glob))]
    b = [json.load(open(p)) for p in sorted(glob.glob(b_glob))]
    lines = ["| form · N · pass | a ms | b ms | b / a |", "|---|---|---|---|"]
    ratios = []
    for key in a[0]:
        ma, mb = statistics.median(d[key] for d in a), statistics.median(d[key] for d in b)
        ratios.append(mb / ma)
        lines.append(f"| {key.replace('|', ' · ')} | {ma:.2f} | {mb:.2f} | {mb / ma:.2f} |")
    lines.append(f"\nb / a: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}–{max(ratios):.2f} "
                 f"({len(a)} and {len(b)} rounds)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--lengths", default="1024,4096")
    t.add_argument("--rounds", type=int, default=5)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "time":
        print(json.dumps(time_forms([int(x) for x in args.lengths.split(",")], args.rounds)))
    else:
        print(compare(args.a, args.b))


if __name__ == "__main__":
    main()
