"""``m2d eval``: score the stories a sample-batch job rendered (``sampler.eval_job``), or
compare scored checkpoints in the paper's table (``--compare``).

The job runs here (embedded ``local`` Ray) or on the profile's Ray cluster, like
sample-batch; the orchestrator never imports the encoders (or torch). ``--compare`` only
reads ``metrics.json`` files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from infra.errors import DataError, first_line
from infra.job_specs import EvalSpec
from infra.storage import filesystem
from orchestrator import runs, submit
from orchestrator.cli import UserError, set_option
from orchestrator.completion import cluster_option
from orchestrator.jobs import EVAL_JOB, eval_spec, spec_options
from orchestrator.output import print_json

# The paper's columns (docs/method.md §8), then ours; a story oracle's scores (say
# evaluation.toy_oracle's) become columns by their own names.
COLUMNS = {
    "visual": "visual",
    "semantic": "semantic",
    "sequence": "sequence",
    "visual_shared_character": "visual, shared character",
    "visual_no_shared_character": "visual, no shared character",
}


def read_summaries(source: str, storage=None) -> dict[str, dict]:
    """The checkpoint summaries under ``source``: an eval'd sample-batch output (its
    ``metrics.json``), one checkpoint folder of it, or a ``metrics.json`` itself."""
    fs, path = filesystem(source, storage)
    path = path.rstrip("/")
    file = path if path.endswith(".json") else f"{path}/metrics.json"
    try:
        data = json.loads(fs.cat_file(file))
    except FileNotFoundError:
        raise DataError(
            f"--compare {source}: no metrics.json; run `m2d eval` on it first"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"--compare {source}: unreadable metrics.json ({first_line(exc)})"
        ) from None
    if isinstance(data, dict) and "metrics" in data:  # one checkpoint's
        return {Path(path).name if not path.endswith(".json") else Path(path).parent.name: data}
    return data


def comparison(sources: list[str], storage=None) -> list[dict]:
    """One row per checkpoint of every source: its name and each metric's
    ``mean [low, high]``, in the order given."""
    rows = []
    for source in sources:
        for label, summary in read_summaries(source, storage).items():
            row = {"checkpoint": label if len(sources) == 1 else f"{Path(source).name}/{label}"}
            row["step"] = summary.get("checkpoint", {}).get("step")
            row["items"] = summary.get("items")
            row["metrics"] = summary.get("metrics", {})
            row["fvd"] = summary.get("fvd", {}).get("value")
            rows.append(row)
    return rows


def metric_columns(rows: list[dict]) -> dict[str, str]:
    """The table's metric columns, key -> header: the paper's (and ours) unless no row has
    any of them (an oracle's table), then every other metric of a row, in the order met."""
    found = dict.fromkeys(name for row in rows for name in row["metrics"])
    columns = dict(COLUMNS) if not found or any(name in COLUMNS for name in found) else {}
    columns.update({name: name for name in found if name not in COLUMNS})
    return columns


def _cell(values: dict | None) -> str:
    if not values:
        return "-"
    return f"{values['mean']:.2f} [{values['low']:.2f}, {values['high']:.2f}]"


def render(rows: list[dict], kind: str) -> str:
    """The table as ``text`` (aligned), ``markdown`` or ``csv`` (means and bounds apart)."""
    columns = metric_columns(rows)
    if kind == "csv":
        out = io.StringIO()
        fields = ["checkpoint", "step", "items"]
        fields += [f"{key}{part}" for key in columns for part in ("", "_low", "_high")]
        fields.append("fvd")
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {"checkpoint": row["checkpoint"], "step": row["step"], "items": row["items"]}
            flat["fvd"] = row["fvd"]
            for key in columns:
                values = row["metrics"].get(key) or {}
                flat.update({key: values.get("mean"), f"{key}_low": values.get("low")})
                flat[f"{key}_high"] = values.get("high")
            writer.writerow(flat)
        return out.getvalue()
    header = ["checkpoint", "step", "items", *columns.values(), "FVD"]
    body = [
        [
            row["checkpoint"],
            str(row["step"]),
            str(row["items"]),
            *(_cell(row["metrics"].get(key)) for key in columns),
            "-" if row["fvd"] is None else f"{row['fvd']:.2f}",
        ]
        for row in rows
    ]
    if kind == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return (
        "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *body]
        )
        + "\n"
    )


@click.command("eval")
@cluster_option(required=True)
@click.option("--samples", help="The --out folder of `m2d sample-batch` to score.")
@spec_options(EvalSpec, "encoder", "encoder_path", "overwrite", "seed", optional=("encoder_path",))
@spec_options(EvalSpec, "reference", "fvd_features", "fvd_path")
@click.option("--num-actors", type=int, help="Encoder actors [default: the profile's workers].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option(
    "--compare",
    multiple=True,
    metavar="SAMPLES",
    help="Print the table of these scored outputs (or checkpoint folders); repeat.",
)
@click.option(
    "--table-out",
    type=click.Path(dir_okay=False),
    help="Also write the --compare table to this .csv or .md file (a new file).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="With --compare: one JSON array instead of the table (checkpoint, step, items, "
    "metrics: name -> {mean, low, high, n}, fvd).",
)
@set_option("ray.address=http://HOST:8265")
@click.pass_context
def eval_(
    ctx: click.Context,
    cluster_name: str,
    samples: str | None,
    num_actors: int | None,
    no_tracking: bool,
    compare: tuple[str, ...],
    table_out: str | None,
    as_json: bool,
    assignments: tuple[str, ...],
    **options,
) -> None:
    """Score every sampled story with the paper's consistency metrics, or a story
    oracle's scores (--encoder evaluation.toy_oracle:oracle: the toy world's, exact; no
    --encoder-path) - metrics.json and stories.csv per checkpoint next to the samples,
    the metrics in MLflow at each checkpoint's training step - or compare scored
    checkpoints with --compare."""
    run = runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, "sft", assignments)
    if compare:
        _compare(list(compare), table_out, run.storage, as_json)
        return
    if as_json:
        raise UserError("--json applies to --compare only (scoring logs to MLflow and files)")
    if not samples:
        raise UserError("--samples: give the --out folder of `m2d sample-batch` (or --compare)")
    spec = eval_spec(run, samples, num_actors, None if no_tracking else run.tracking, options)
    submit.run_job_on(run, EVAL_JOB, spec, "eval")


def _compare(sources: list[str], table_out: str | None, storage, as_json: bool) -> None:
    kind = None
    if table_out:
        kind = {".csv": "csv", ".md": "markdown"}.get(Path(table_out).suffix)
        if kind is None:
            raise UserError(f"--table-out {table_out}: name a .csv or .md file")
        if Path(table_out).exists():
            raise UserError(f"--table-out {table_out}: exists; give a new file")
    rows = comparison([runs.absolute(s) for s in sources], storage)
    if as_json:
        print_json(rows)
    else:
        click.echo(render(rows, "text"), nl=False)
    if table_out and kind:
        Path(table_out).write_text(render(rows, kind))
        click.echo(f"table written to {table_out}")
