"""What an experiment declares for docs/RESULTS.md: each paper claim it tests and its rule.

An experiment module ends with `CLAIMS = (Claim(...), ...)`: the algorithm, the claim its paper
makes (short text, from ALGORITHMS.md's sections (d), (e) and 13), the figures that show it and
`measure(results) -> Measured`, which reads the module's own results.json into the setting, the
numbers (mean ± std over seeds, final round, never best-of-run) and the checks of the rule:
inequalities on the recorded means with their margins written in the text. `experiments.report`
loops over the declarations; a verdict is computed from the checks, never typed.
"""

from typing import Callable, NamedTuple

# "About equal" in a claim: means within this many accuracy points (0.02 = 2 points).
NEAR = 0.02


class Check(NamedTuple):
    """One inequality of a row's rule, with its outcome."""

    text: str
    holds: bool


class Measured(NamedTuple):
    """What a row reports: the setting, the numbers and the checks of its rule."""

    setting: str
    numbers: list[str]
    checks: list[Check]


class Claim(NamedTuple):
    """An algorithm, its paper's claim, the figures showing it and how to measure it."""

    algorithm: str
    claim: str
    figures: tuple[str, ...]
    measure: Callable[[dict], Measured]


def verdict(checks: list[Check]) -> str:
    """**yes** when every check holds, **no** when none does, **partly** (k/n) otherwise."""
    held = sum(check.holds for check in checks)
    if held == len(checks):
        return "**yes**"
    return "**no**" if held == 0 else f"**partly** ({held}/{len(checks)})"


def pm(stats: dict, digits: int = 3) -> str:
    """`mean ± std` of a {"mean", "std"} entry."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def seeds_text(settings: dict) -> str:
    seeds = settings["seeds"]
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def print_claims(claims, results: dict) -> None:
    """What docs/RESULTS.md would say of freshly written `results`: each claim's numbers, the
    checks of its rule and its verdict (a partial run, e.g. a subset of methods, says so)."""
    for claim in claims:
        try:
            measured = claim.measure(results)
        except KeyError as missing:
            print(f"{claim.algorithm}: not measured (this run has no {missing})")
            continue
        print(f"{claim.algorithm}: reproduced {verdict(measured.checks).replace('**', '')}")
        for line in measured.numbers:
            print(f"  {line}")
        for check in measured.checks:
            print(f"  {'✓' if check.holds else '✗'} {check.text}")
    print(f"wall time {results['settings']['wall_seconds']:.1f} s")
