"""``m2d launch``: resolve a cluster profile and a stage recipe into a run and start it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import click
import yaml

from infra.config import STAGES, RunConfig, looks_secret
from infra.deepspeed_config import deepspeed_config
from infra.errors import ConfigError, M2DError, ServiceError, first_line
from infra.job_entry import EXIT_USER_ERROR
from orchestrator import profiles, ray_jobs, runs, submit
from orchestrator.cli import set_option, verbose
from orchestrator.completion import cluster_option, run_names
from orchestrator.placement import placement_lines

# Credentials the workers read from their own environment, never from config.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def credential_status() -> dict[str, str]:
    """Which credential variables are set here: names only, never values."""
    names = {*CREDENTIAL_VARS, *(name for name in os.environ if looks_secret(name))}
    relevant = sorted(name for name in names if name.startswith(("AWS_", "MLFLOW_", "RAY_")))
    return {name: "set" if os.environ.get(name) else "unset" for name in relevant}


def render_dry_run(run: RunConfig) -> str:
    """The resolved run config and its DeepSpeed JSON, as --dry-run prints them."""
    parts = [
        "# Resolved run configuration (nothing submitted)",
        yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False).rstrip(),
        "# Credentials (read from the environment of each process; values never shown)",
        yaml.safe_dump({"credentials": credential_status()}, sort_keys=False).rstrip(),
        "# Placement (Ray Train)",
        *(f"# {line}" for line in placement_lines(run)),
        *_shipping_lines(run),
        "# DeepSpeed config",
        json.dumps(deepspeed_config(run), indent=2),
    ]
    return "\n".join(parts) + "\n"


def _shipping_lines(run: RunConfig) -> list[str]:
    """What a remote job takes with it (none for a local run: it runs this checkout)."""
    if run.ray.address == "local":
        return []
    env = submit.runtime_env(run)
    lines = ["# Runtime environment (shipped with the job)"]
    for folder in env.get("py_modules", []):
        lines.append(f"#   {folder}  {submit.shipped_bytes(folder) / 1e6:.2f} MB")
    if env.get("excludes"):
        lines.append(f"#   excluded: {' '.join(env['excludes'])}")
    shown = {k: v for k, v in env.items() if k not in ("py_modules", "excludes")}
    lines.append(f"#   {json.dumps(shown)}" if shown else "#   (no image, pip or env vars)")
    return lines


def render_plan(run: RunConfig) -> str:
    """`m2d plan`'s table for ``run`` as comment lines (or why there is none)."""
    from orchestrator.plan import plan_for, report

    notes: list[str] = []
    try:
        table = report.as_table(plan_for(run, warn=notes.append))
    except M2DError as exc:
        return f"# Plan: not available ({exc})\n"
    return "# Plan (m2d plan)\n" + "".join(
        f"# {line}".rstrip() + "\n" for line in [*notes, *table.splitlines()]
    )


def check_fits(run: RunConfig) -> None:
    """Refuse a run the planner says cannot fit its GPUs, naming the cheapest change that
    does; a plan that cannot be made (model configs out of reach) refuses nothing."""
    from orchestrator.plan import plan_for
    from orchestrator.plan.estimate import GIB

    try:
        found = plan_for(run, warn=lambda line: click.echo(line, err=True))
    except M2DError as exc:
        click.echo(f"plan skipped: {exc}", err=True)
        return
    if found.fits:
        return
    fix = (
        "cheapest change that fits: " + " ".join(f"--set {a}" for a in found.suggestion)
        if found.suggestion
        else "no change of ZeRO, offload, checkpointing or nodes fits"
    )
    raise ConfigError(
        f"{run.cluster} {run.stage}: the plan needs {found.memory.peak / GIB:.1f} GiB per GPU "
        f"of {found.memory_gib:.1f} GiB (m2d plan --cluster {run.cluster} --stage {run.stage} "
        f"shows why); {fix}; or pass --force to launch anyway"
    )


def _resolve(ctx, cluster_name, stage, assignments) -> RunConfig:
    return runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, stage, assignments)


@dataclass(frozen=True)
class Source:
    """Where an SFT run's weights start: a pretrain run (``--from``; None: the cluster's
    latest finished one) or, with ``base``, the model's own weights (``model.source``) -
    SFT with no multi-scene pre-training, the paper's "SFT only" setting."""

    run: str | None = None
    base: bool = False


def _resolve_new_run(ctx, cluster_name, stage, assignments, source: Source) -> RunConfig:
    if not (cluster_name and stage):
        raise click.UsageError("give --cluster and --stage (or --resume RUN)")
    if stage != "sft" and (source.run or source.base):
        raise click.UsageError("--from and --from-base apply to --stage sft only")
    if source.run and source.base:
        raise click.UsageError("give --from RUN or --from-base, not both")
    run = _resolve(ctx, cluster_name, stage, assignments)
    if stage == "sft" and not source.base:
        found = runs.load_record(source.run) if source.run else _latest_pretrain(cluster_name)
        run = run.model_copy(update={"init_from": runs.latest_checkpoint(found)})
    return run


def _resume_point(record: runs.RunRecord) -> str:
    """Where ``--resume`` would continue the run, as --dry-run prints it."""
    found = runs.checkpoints(record)
    if not found:
        return f"# --resume {record.name}: no checkpoint yet, it would start again at step 0\n"
    return f"# --resume {record.name}: it would continue from {found[-1]}\n"


def _workers_line(run: RunConfig) -> str:
    workers, ds = run.workers, run.deepspeed
    return (
        f"now {workers.num_workers} worker(s) on {workers.nodes} node(s), "
        f"{ds.micro_batch_per_gpu} x {ds.gradient_accumulation} micro-batch(es) each per step "
        f"(global batch {run.recipe.global_batch})"
    )


def _latest_pretrain(cluster_name: str) -> runs.RunRecord:
    record = runs.latest_finished(cluster_name, "pretrain")
    if record is None:
        raise ConfigError(
            f"no finished pretrain run of cluster {cluster_name!r} to start SFT from; run "
            f"`m2d launch --cluster {cluster_name} --stage pretrain` first or pass --from RUN"
        )
    return record


def _start(record: runs.RunRecord, run: RunConfig, follow: bool) -> int:
    click.echo(f"run {record.name}: {run.stage} on {run.cluster} -> {record.run_dir}")
    if _opens_mlflow_here(run):
        click.echo(f"MLflow run: {_open_mlflow(record, run)}")
    else:
        click.echo(
            f"MLflow: {run.tracking.uri} (experiment {run.tracking.experiment}); the job opens "
            "the run in the cluster's store"
        )
    if record.kind == "local":
        return submit.run_local(record, verbose=verbose())
    first = record.job_id is None
    try:
        submit.submit_remote(record, run, submission_id=_next_job_id(record))
    except ServiceError:
        if _opens_mlflow_here(run):
            from infra.tracking import end_run

            end_run(run, record.run_dir)  # no job will continue the run opened above
        if first:  # nothing ran: the name is free again, as if never launched
            runs.discard_run_folder(record)
        raise
    click.echo(f"submitted to {run.ray.address}; follow with `m2d logs {record.name} -f`")
    if follow:
        return _follow_remote(record)
    return 0


def _check_input(run: RunConfig) -> None:
    """The stage's manifest or latents must exist (a local run reads them from here; the
    job checks again wherever it runs)."""
    from infra.storage import check_stage_input

    check_stage_input(run.data, run.stage, run.storage)


def _opens_mlflow_here(run: RunConfig) -> bool:
    """Whether the launcher opens the run's MLflow run (and so can print its URL): always
    for local runs; for remote ones when the store is a server, since a file or sqlite
    URI names a store on the cluster's machines."""
    from infra.tracking import is_server

    return run.ray.address == "local" or is_server(run.tracking.uri)


def _open_mlflow(record: runs.RunRecord, run: RunConfig) -> str:
    """Create (or, resuming, continue) the run's MLflow run; the job continues it. Its URL."""
    from infra.tracking import fail_fast, open_run

    with fail_fast():
        try:
            return open_run(run, record.run_dir, record.name, {}).url
        except Exception as exc:
            raise ServiceError(
                f"tracking.uri {run.tracking.uri}: cannot open the run's MLflow run "
                f"({first_line(exc)}); start the server or fix tracking.uri"
            ) from None


def _next_job_id(record: runs.RunRecord) -> str:
    """The run's name for its first Ray job, then ``NAME-resume-N`` (Ray's names are unique)."""
    if record.job_id is None:
        return record.name
    previous = record.job_id.rsplit("-resume-", 1)
    count = int(previous[1]) if len(previous) == 2 and previous[1].isdigit() else 0
    return f"{record.name}-resume-{count + 1}"


def _new_record(run: RunConfig, run_name: str, smoke: bool = False) -> runs.RunRecord:
    """Create the run's folder (its run_config.json and provenance.json) and its registry
    record."""
    from infra.run_folder import write_provenance
    from orchestrator import provenance

    config_uri = runs.create_run_folder(run, run_name)
    root = click.get_current_context().find_root().obj or {}
    profile = profiles.find_profile(run.cluster, profiles.clusters_dir(root.get("clusters_dir")))
    found, diff = provenance.collect(run, profile)
    write_provenance(runs.run_dir(run, run_name), run.storage, found, diff)
    return runs.RunRecord(
        name=run_name,
        cluster=run.cluster,
        stage=run.stage,
        run_dir=runs.run_dir(run, run_name),
        config_uri=config_uri,
        kind="local" if run.ray.address == "local" else "remote",
        address=run.ray.address,
        tracking_uri=run.tracking.uri,
        experiment=run.tracking.experiment,
        storage=run.storage.model_dump(),
        smoke=smoke,
    )


def _smoke(ctx, run: RunConfig, assignments: tuple[str, ...]) -> None:
    """Smoke-test ``run``'s stage (pretrain: then SFT from it); exit 1 unless all pass."""
    from orchestrator import smoke

    def echo(line: str) -> None:  # a failed remote job's last lines
        click.echo(f"  {line}", nl=False, err=True)

    def start(record: runs.RunRecord, run: RunConfig, job_id: str) -> int:
        click.echo(f"{job_id}: {run.recipe.steps} steps on {run.cluster} -> {record.run_dir}")
        return smoke.run_to_end(record, run, job_id, echo)

    first = smoke.shrink(run)
    record = _new_record(first, smoke.smoke_name(first), smoke=True)
    checks = smoke.check_stage(record, first, start)
    if run.stage == "pretrain" and all(c.ok for c in checks):
        sft = _resolve(ctx, run.cluster, "sft", assignments)
        sft = smoke.shrink(sft.model_copy(update={"init_from": runs.latest_checkpoint(record)}))
        sft_record = _new_record(sft, smoke.smoke_name(sft), smoke=True)
        checks += smoke.check_stage(sft_record, sft, start)
        checks.append(smoke.check_linked(sft_record, record, sft))
    click.echo(smoke.render(checks), nl=False)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise click.ClickException(f"smoke test failed: {len(failed)} of {len(checks)} checks")
    click.echo(f"smoke test passed: {len(checks)} checks")


def _smoke_size(run: RunConfig) -> RunConfig:
    from orchestrator import smoke

    return smoke.shrink(run)


def _follow_remote(record: runs.RunRecord) -> int:
    return submit.follow_remote_logs(record)


@click.command()
@cluster_option()
@click.option("--stage", type=click.Choice(STAGES), help="Training stage.")
@set_option("recipe.steps=200 or deepspeed.zero_stage=3; with --resume: workers.num_workers=4")
@click.option(
    "--dry-run", is_flag=True, help="Print the resolved run, its DeepSpeed JSON and its plan only."
)
@click.option(
    "--force",
    is_flag=True,
    help="Launch even when `m2d plan` says it does not fit or the cluster lacks the nodes.",
)
@click.option("--name", help="Run name (default CLUSTER-STAGE-UTCTIME).")
@click.option(
    "--resume",
    "resume_name",
    metavar="RUN",
    shell_complete=run_names,
    help="Continue RUN from its checkpoint.",
)
@click.option(
    "--from",
    "from_run",
    metavar="RUN",
    shell_complete=run_names,
    help="SFT: start from this pretrain run.",
)
@click.option(
    "--from-base",
    is_flag=True,
    help="SFT: start from the model's own weights (model.source), with no pretrain run.",
)
@click.option("--follow", is_flag=True, help="Remote runs: stream the job's logs until it ends.")
@click.option(
    "--smoke",
    is_flag=True,
    help="Train a tiny version of the stage for 2 steps, checkpoint, resume (pretrain: then "
    "SFT from it) in *-smoke-* runs; print pass/fail per check.",
)
@click.pass_context
def launch(
    ctx: click.Context,
    cluster_name: str | None,
    stage: str | None,
    assignments: tuple[str, ...],
    dry_run: bool,
    name: str | None,
    resume_name: str | None,
    from_run: str | None,
    from_base: bool,
    follow: bool,
    smoke: bool,
    force: bool,
) -> None:
    """Launch STAGE (pretrain or sft) on cluster CLUSTER, or --resume a run."""
    if smoke and (resume_name or name):
        raise click.UsageError("--smoke names its own runs; it takes no --resume or --name")
    if resume_name:
        if cluster_name or stage or from_run or from_base:
            raise click.UsageError("--resume takes no --cluster/--stage/--from/--from-base")
        record = runs.load_record(resume_name)
        run = runs.read_run_config(record)
        if assignments:  # on other workers: the checkpoint is resharded when it loads
            run = profiles.resize(run, assignments)
        if dry_run:  # reads the run's folder and record, writes neither
            click.echo(render_dry_run(run) + render_plan(run) + _resume_point(record), nl=False)
            return
        runs.check_not_running(record)  # one job per run folder
        if assignments:
            kept = runs.rewrite_run_config(record, run)
            click.echo(f"run {record.name}: {_workers_line(run)}; its earlier config: {kept}")
    else:
        if name:  # before anything is read, checked or started
            runs.check_run_name(name)
        run = _resolve_new_run(ctx, cluster_name, stage, assignments, Source(from_run, from_base))
        if dry_run:
            shown = _smoke_size(run) if smoke else run
            click.echo(render_dry_run(shown) + render_plan(shown), nl=False)
            return
        _check_before_writing(run, checks=not (smoke or force), mlflow=not smoke)
        if smoke:
            _smoke(ctx, run, assignments)
            return
        record = _new_record(run, runs.new_run_name(run, name))
    _run_to_end(record, run, follow)


def _check_before_writing(run: RunConfig, checks: bool, mlflow: bool = True) -> None:
    """What a new run must pass before its folder is made: the plan fits and the cluster
    can hold its workers (``checks``: not with --force), its training input is there (a
    local run) or its cluster answers, and its MLflow store answers (``mlflow``)."""
    if checks:
        check_fits(run)
    if run.ray.address == "local":
        _check_input(run)  # a training input that is not there fails before any write
    else:
        ray_jobs.job_client(run.ray.address)  # so does an unreachable cluster
        if checks:
            from orchestrator.placement import check_cluster

            check_cluster(run)  # and one that can never hold the workers
    if mlflow and _opens_mlflow_here(run):
        from infra.tracking import check_store

        check_store(run.tracking.uri)  # and an MLflow store that does not answer


def _run_to_end(record: runs.RunRecord, run: RunConfig, follow: bool) -> None:
    """Start the run's job and wait for it (a remote one: unless it was only submitted);
    a stop, a user error or a failure ends the command with its status."""
    code = _start(record, run, follow)
    if code and runs.load_record(record.name).stopped:
        raise click.ClickException(
            f"run {record.name} stopped; continue it with `m2d launch --resume {record.name}`"
        )
    if code == EXIT_USER_ERROR:  # the job said what was wrong in its own one line
        raise click.exceptions.Exit(code)
    if code:
        raise click.ClickException(f"run {record.name} failed (exit {code}); see the log above")


@click.command()
@click.argument("name", shell_complete=run_names)
@cluster_option(
    help="Run it on this cluster: its workers, DeepSpeed, Ray, storage and tracking; the "
    "recipe, model, data and starting weights stay the run's."
)
@set_option("recipe.steps=2000 or recipe.seed=1")
@click.option("--name", "new_name", help="The new run's name (default CLUSTER-STAGE-UTCTIME).")
@click.option("--dry-run", is_flag=True, help="Print the new run's configuration and plan only.")
@click.option("--follow", is_flag=True, help="Remote runs: stream the job's logs until it ends.")
@click.option("--force", is_flag=True, help="Launch even when `m2d plan` says it does not fit.")
@click.pass_context
def relaunch(
    ctx: click.Context,
    name: str,
    cluster_name: str | None,
    assignments: tuple[str, ...],
    new_name: str | None,
    dry_run: bool,
    follow: bool,
    force: bool,
) -> None:
    """Start a new run like run NAME, from the configuration saved in its folder
    (run_config.json; its provenance.json says what code and data it ran with): the same
    stage, recipe, model, data and starting weights, here or on --cluster, with --set
    changes. NAME itself is not touched."""
    if new_name:
        runs.check_run_name(new_name)
    record = runs.load_record(name)
    old = runs.read_run_config(record)
    other = None
    if cluster_name:
        clusters = ctx.find_root().obj["clusters_dir"]
        other = runs.resolve_run(clusters, cluster_name, old.stage)
    run = runs.with_absolute_paths(profiles.relaunched(old, other, assignments))
    if dry_run:
        click.echo(render_dry_run(run) + render_plan(run), nl=False)
        return
    _check_before_writing(run, checks=not force)
    record = _new_record(run, runs.new_run_name(run, new_name))
    click.echo(f"run {record.name}: like {name}")
    _run_to_end(record, run, follow)
