"""Assemble BENCHMARKS.md from the suites' result files (benchmarks/results/*.md).

Each suite (`recurra bench SUITE`) writes benchmarks/results/SUITE.md with its command, machine,
table, verdict and chart; this script puts them under one preamble, in a fixed order.
Run: python benchmarks/build_benchmarks_md.py
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["layers", "pararnn", "zoo", "zoo_rerun", "zoo_fla", "zoo_b", "decode"]

PREAMBLE = """# Benchmarks

Every number here was measured by the command printed above its table, on this project's
2-core CPU machine, float32, 2 torch threads unless a table says otherwise. Methods are timed
side by side in one process, interleaved in a rotating order after warm-up rounds; we report
medians, and ratios of medians. Outputs are checked equal before anything is timed.
Each section says plainly which goals are met. Regenerate a section with its command; rebuild
this file with `python benchmarks/build_benchmarks_md.py`.

SUMMARY
"""


def main() -> None:
    files = sorted(RESULTS.glob("*.md"), key=lambda p: (ORDER.index(p.stem)
                                                        if p.stem in ORDER else 99, p.stem))
    parts = []
    for f in files:
        text = f.read_text()
        # image links are relative to the results folder
        text = re.sub(r"\]\(([^/():]+\.png)\)", r"](benchmarks/results/\1)", text)
        parts.append(text.strip())
    summary_file = RESULTS.parent / "SUMMARY.md"
    summary = summary_file.read_text().strip() if summary_file.exists() else ""
    out = PREAMBLE.replace("SUMMARY", summary) + "\n\n" + "\n\n".join(parts) + "\n"
    (ROOT / "BENCHMARKS.md").write_text(out)
    print(f"wrote BENCHMARKS.md from {len(files)} result files")


if __name__ == "__main__":
    main()
