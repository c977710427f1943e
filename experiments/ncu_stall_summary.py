"""Summarise ncu's source page (`ncu -i X.ncu-rep --page source --csv --print-source sass`, written by
tools/ncu_stalls.sh): stall reasons over the launch, stall samples by opcode, the SASS lines with the most samples
(with their top three reasons), the executed instruction mix by opcode, and the shared-memory wavefronts by
instruction (with the ideal count and the excess of bank conflicts; the eleventh session's find in the backward).

  python -m experiments.ncu_stall_summary fwd_sass.csv [TOP_LINES]
"""
import collections
import csv
import sys


def number(x):
    return float(x.replace(",", "") or 0) if x else 0.0


def opcode(source, modifiers=False):
    """The instruction's opcode (modifiers=True: with its modifiers, e.g. LDS.128, HGMMA.64x64x16.F32.BF16)."""
    words = source.split()
    if not words:
        return "?"
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op if modifiers else op.split(".")[0]


def main(path, top):
    rows = list(csv.reader(open(path)))
    at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[at]
    lines = [dict(zip(header, r)) for r in rows[at + 1:] if len(r) == len(header)]
    reasons = [h for h in header if h.startswith("stall_")]
    samples = sum(number(d["Warp Stall Sampling (All Samples)"]) for d in lines) or 1.0
    by_reason, by_op, mix = collections.Counter(), collections.Counter(), collections.Counter()
    for d in lines:
        by_op[opcode(d["Source"])] += number(d["Warp Stall Sampling (All Samples)"])
        mix[opcode(d["Source"])] += number(d["Instructions Executed"])
        for r in reasons:
            by_reason[r] += number(d[r])
    executed = sum(mix.values()) or 1.0
    print(f"stall samples {samples:.0f} over {len(lines)} SASS lines")
    print("stall reasons:", ", ".join(f"{k[6:]} {v / samples:.1%}" for k, v in by_reason.most_common(12)))
    print("samples by opcode:", ", ".join(f"{k} {v / samples:.1%}" for k, v in by_op.most_common(15)))
    print(f"instructions executed (warp-level) {executed:.4g}:",
          ", ".join(f"{k} {v / executed:.1%}" for k, v in mix.most_common(20)))
    print("SASS lines with the most samples (line, share, instruction, executions, top reasons):")
    ranked = sorted(enumerate(lines), key=lambda x: -number(x[1]["Warp Stall Sampling (All Samples)"]))
    for i, d in ranked[:top]:
        s = number(d["Warp Stall Sampling (All Samples)"])
        top3 = sorted(((number(d[r]), r[6:]) for r in reasons), reverse=True)[:3]
        print(f"{i:5d} {s / samples:6.2%} {d['Source'][:72]:72s} {d['Instructions Executed']:>11s} "
              + " ".join(f"{r} {v / max(s, 1):.0%}" for v, r in top3 if v))
    columns = ("L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal", "L1 Wavefronts Shared Excessive")
    if all(c in header for c in columns):
        shared = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
        for d in lines:
            for k, c in enumerate(columns):
                shared[opcode(d["Source"], modifiers=True)][k] += number(d[c])
        total = sum(v[0] for v in shared.values()) or 1.0
        print(f"shared-memory wavefronts {total:.4g}, excessive {sum(v[2] for v in shared.values()):.4g} "
              "(by instruction: wavefronts, share, ideal, excessive):")
        for op, (wf, ideal, excess) in sorted(shared.items(), key=lambda kv: -kv[1][0])[:8]:
            if wf:
                print(f"  {op[:32]:32s} {wf:10.4g} {wf / total:6.1%} {ideal:10.4g} {excess:10.4g}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
