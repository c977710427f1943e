"""Summarise ncu's source page (`ncu -i X.ncu-rep --page source --csv --print-source sass`, written by
tools/ncu_stalls.sh): stall reasons over the launch, stall samples by opcode, the SASS lines with the most samples
(with their top three reasons), and the executed instruction mix by opcode.

  python -m experiments.ncu_stall_summary fwd_sass.csv [TOP_LINES]
"""
import collections
import csv
import sys


def number(x):
    return float(x.replace(",", "") or 0) if x else 0.0


def opcode(source):
    words = source.split()
    if not words:
        return "?"
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
