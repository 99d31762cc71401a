"""Mutation score per module from mutmut's results (run after ``mutmut run``; see ``make mutation``).

Prints, for each module, how many mutants the tests killed, how many survived, timed out or had no covering
test, and the score killed / (killed + survived + no tests); then the surviving mutants' names, which
``mutmut show NAME`` prints as a diff. A timeout counts as killed (the mutant made the tests hang); "not run" are mutants not yet run.
"""

import collections
import subprocess
import sys

KILLED = {"killed", "timeout", "caught by type check"}


def main(mutmut: str = "mutmut") -> None:
    lines = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    counts = collections.defaultdict(collections.Counter)
    survivors = []
    for line in lines.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name:
            continue
        module = name.split(".x")[0]
        counts[module][status] += 1
        if status in ("survived", "no tests"):
            survivors.append(f"{status}: {name}")
    print(f"{'module':58} {'killed':>7} {'survived':>8} {'no tests':>8} {'not run':>7} {'score':>6}")
    for module, count in sorted(counts.items()):
        killed = sum(count[s] for s in KILLED)
        survived, untested = count["survived"], count["no tests"]
        other = sum(count.values()) - killed - survived - untested
        checked = killed + survived + untested
        score = f"{100 * killed / checked:.1f}%" if checked else "-"
        print(f"{module:58} {killed:7} {survived:8} {untested:8} {other:7} {score:>6}")
    print("\n".join(survivors))


if __name__ == "__main__":
    main(*sys.argv[1:])
