"""The mask ablation's analysis (``benchmarks/mask_ablation.py``, docs/ablation.md): the
toy oracle's story scores of each row of the experiment (a mask policy and its training)
summarized with bootstrap intervals, the agreement a row's scenes would have with no
coordination, issue 28's targets met or missed, and the report's table. Pure: rows of
scores in, numbers and markdown out."""

from __future__ import annotations

import itertools

from evaluation.metrics import summarize_rows
from evaluation.toy_oracle import chance

FIXED_METRICS = ("agreement", "alignment", "color", "shape", "motion", "leakage")
EXTEND_METRICS = ("context_agreement", "alignment", "leakage")


def independent_agreement(stories: list[list[tuple]]) -> float | None:
    """The agreement the policy's scenes would have if each were drawn on its own: pairs
    of scenes at the story's positions taken from two *different* stories. A model whose
    backgrounds lean to a few (a bias, or one noise for all stories) agrees by that much
    with no cross-scene attention at all; chance (1/12) holds for uniform ones only."""
    hits = [
        a[i][0] is not None and a[i] == b[j]
        for a, b in itertools.permutations(stories, 2)
        for i, j in itertools.combinations(range(min(len(a), len(b))), 2)
    ]
    return sum(hits) / len(hits) if hits else None


def summarize(rows: list[dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """Mean with a percentile-bootstrap 95% interval of each metric over ``rows``."""
    values = [
        {m: float(row[m]) for m in metrics if row.get(m) not in (None, "", "None")} for row in rows
    ]
    return summarize_rows(values, seed=0)


# ---------------------------------------------------------------------- the report


def results_table(results: dict, names: list[str]) -> dict[str, dict]:
    """Per row name (``results`` is keyed by (name, seed): each mode's scored stories and
    the fixed mode's scene backgrounds): each metric's mean [low, high] over the stories
    of every seed, and the per-seed means of the two the targets rest on."""
    table = {}
    for policy in names:
        seeds = sorted(seed for p, seed in results if p == policy)
        fixed = [row for seed in seeds for row in results[(policy, seed)]["fixed"]]
        backgrounds = [story for seed in seeds for story in results[(policy, seed)]["backgrounds"]]
        extend = [row for seed in seeds for row in results[(policy, seed)]["extend"]]
        table[policy] = {
            "fixed": summarize(fixed, FIXED_METRICS),
            "extend": summarize(extend, EXTEND_METRICS),
            "stories": len(fixed),
            "independent": independent_agreement(backgrounds),
            "per_seed": {
                seed: summarize(results[(policy, seed)]["fixed"], ("agreement", "alignment"))
                for seed in seeds
            },
        }
    return table


def _cell(summary: dict, metric: str) -> str:
    if metric not in summary:
        return "-"
    s = summary[metric]
    return f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def _mean(table: dict, policy: str, metric: str, mode: str = "fixed") -> float | None:
    found = table.get(policy, {}).get(mode, {}).get(metric)
    return None if found is None else found["mean"]


def targets(table: dict) -> list[str]:
    """Issue 28's targets, each met or missed by how much (None where not measured)."""
    v2 = _mean(table, "v2", "agreement")
    isolated = _mean(table, "isolated", "agreement")
    v2_align, full_align = _mean(table, "v2", "alignment"), _mean(table, "full", "alignment")
    v2_leak, full_leak = _mean(table, "v2", "leakage"), _mean(table, "full", "leakage")
    extend = _mean(table, "v2", "context_agreement", "extend")
    checks = [
        ("v2 cross-scene agreement >= 0.95", v2, None if v2 is None else v2 - 0.95),
        ("isolated agreement <= 0.35", isolated, None if isolated is None else 0.35 - isolated),
        (
            "v2 own-prompt alignment >= full + 0.10",
            v2_align,
            None if None in (v2_align, full_align) else v2_align - full_align - 0.10,
        ),
        (
            "leakage under full above v2's",
            full_leak,
            None if None in (v2_leak, full_leak) else full_leak - v2_leak,
        ),
        (
            "v2 extended scene agrees with its context >= 0.9",
            extend,
            None if extend is None else extend - 0.9,
        ),
    ]
    lines = []
    for name, value, margin in checks:
        if margin is None:
            lines.append(f"- {name}: not measured")
        else:
            strict = name.startswith("leakage")  # "above": a tie is no difference
            verdict = "met" if margin > 0 or (margin == 0 and not strict) else "MISSED"
            lines.append(f"- {name}: {value:.3f}, {verdict} (margin {margin:+.3f})")
    return lines


def table_lines(table: dict[str, dict]) -> list[str]:
    """The report's markdown: a row per table row and one of chance levels, then each
    row's per-seed agreement and alignment."""
    odds = chance(3)
    head = [
        "policy",
        "stories",
        FIXED_METRICS[0],
        "agreement if independent",
        *FIXED_METRICS[1:],
        "extend: context_agreement",
        "extend: alignment",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for policy, row in table.items():
        cells = [_cell(row["fixed"], m) for m in FIXED_METRICS]
        independent = row["independent"]
        cells.insert(1, "-" if independent is None else f"{independent:.2f}")
        cells += [_cell(row["extend"], "context_agreement"), _cell(row["extend"], "alignment")]
        lines.append(f"| {policy} | {row['stories']} | " + " | ".join(cells) + " |")
    chance_cells = [f"{odds[m]:.3f}" if m in odds else "-" for m in FIXED_METRICS]
    chance_cells.insert(1, f"{odds['agreement']:.3f}")
    lines.append(
        "| chance | | " + " | ".join(chance_cells) + f" | {odds['context_agreement']:.3f} | |"
    )
    lines += ["", "Per seed (agreement / alignment):", ""]
    for policy, row in table.items():
        per = ", ".join(
            f"seed {seed}: {v['agreement']['mean']:.2f} / {v['alignment']['mean']:.2f}"
            for seed, v in row["per_seed"].items()
            if "agreement" in v and "alignment" in v
        )
        lines.append(f"- {policy}: {per}")
    return lines
