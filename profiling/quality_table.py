"""Markdown table of `asyncdiff-rt eval` results by (N, S) and split: adherence, PSNR and
feature distance against sequential, and the split's imbalance (largest component's FLOPs
over the mean).

    python -m profiling.quality_table profiling/results/eval_quality_unet/eval.json
"""
import json
import sys


def table(result):
    rows = result["rows"]
    seq = next(r for r in rows if r["n_components"] == 1)
    lines = [f"| config | split | imbalance | adherence | PSNR dB vs sequential | feature distance |",
             "|---|---|---|---|---|---|",
             f"| sequential | - | - | {seq['adherence']:.1%} | inf | 0.0000 |"]
    for r in rows:
        if r["n_components"] == 1:
            continue
        imbalance = r.get("extra", {}).get("imbalance")
        lines.append(f"| {r['n_components']}x{r['stride']} W={r['warmup']} | {r['partition']} | "
                     f"{imbalance:.3f} | {r['adherence']:.1%} | {r['psnr_db']:.2f} | {r['feature_distance']:.4f} |")
    s = result["settings"]
    lines.append("")
    lines.append(f"{s['samples']} {s['prompts']} prompts, seeds {s['seed']}..{s['seed'] + s['samples'] - 1}, "
                 f"{s['steps']} DDIM steps, guidance {s['guidance_scale']}; command: `{result['command']}`")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(table(json.load(f)))
        print()
