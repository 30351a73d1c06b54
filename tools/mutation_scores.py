"""The mutation score of each module, from `mutmut results --all true` on stdin, as a Markdown table.

A mutant counts as caught when a test failed (`killed`) or ran out of time (`timeout`, `segfault`); the score is
caught over all mutants, so a mutant no test reaches (`no tests`) counts against it. `scripts/mutation.sh` pipes
mutmut's results here.
"""
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

if __package__ in (None, ""):  # run as `python tools/mutation_scores.py`: make `util` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.errors import run_cli

CAUGHT = {"killed", "timeout", "segfault"}
LINE = re.compile(r"^\s*(?P<module>[\w.]+?)\.x(?:_|\u01c1)\S*__mutmut_\d+: (?P<status>.+?)\s*$")


def module_counts(lines: Iterable[str]) -> dict[str, Counter]:
    """{module: Counter of statuses} of mutmut's result lines (others ignored)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        match = LINE.match(line)
        if match:
            counts[match["module"]][match["status"]] += 1
    return dict(counts)


def score_table(counts: dict[str, Counter]) -> str:
    rows = ["| module | mutants | caught | survived | no test reaches | score |", "|---|---|---|---|---|---|"]
    for module in sorted(counts):
        count = counts[module]
        total, caught = sum(count.values()), sum(count[s] for s in CAUGHT)
        rows.append(f"| `{module}` | {total} | {caught} | {count['survived']} | {count['no tests']} | "
                    f"{100 * caught / total:.0f} % |")
    return "\n".join(rows)


def main() -> None:
    counts = module_counts(sys.stdin)
    if not counts:
        raise ValueError("no mutmut results on stdin (run `mutmut run` first)")
    print(score_table(counts))


if __name__ == "__main__":
    run_cli("mutation_scores.py", main)
