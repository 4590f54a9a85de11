"""The `crowdtrain` command: demo, simulate, data, bench, config.

Every error that reaches a person is one sentence on stderr and a non-zero exit status, never a
traceback (exit status 2 for bad input, 1 for a failure while running).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from crowdtrain.config import (
    ConfigError,
    RunConfig,
    config_hash,
    derived_settings,
    load_config,
    load_raw,
)
from crowdtrain.server.admission import AdmissionConfig

if TYPE_CHECKING:
    from crowdtrain.sim.scenario import Scenario

app = typer.Typer(
    help="Train one neural network with compute donated by many volunteers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Pack corpora into content-addressed shards.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (their results are recorded in docs/).")
config_app = typer.Typer(help="Check and show run configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")

console = Console()
WandbFlag = Annotated[
    bool, typer.Option(help="Log each round to Weights & Biases (the wandb extra).")
]
TensorboardDir = Annotated[
    Path | None,
    typer.Option(help="Log each round to TensorBoard in this folder (the tensorboard extra)."),
]
errors = Console(stderr=True, soft_wrap=True)


@contextmanager
def _friendly_errors() -> Iterator[None]:
    """Turn the project's typed errors into one line on stderr and an exit status."""
    from crowdtrain.client.transfer import ClientError
    from crowdtrain.codec import PayloadError
    from crowdtrain.data import DataError
    from crowdtrain.server.tracking import TrackerUnavailable

    try:
        yield
    except (ConfigError, DataError, PayloadError, ClientError, TrackerUnavailable) as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        errors.print("interrupted")
        raise typer.Exit(130) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        errors.print(
            f"[red]error:[/red] {escape(f'{exc.strerror or exc}{where}')}", highlight=False
        )
        raise typer.Exit(1) from None
    except Exception as exc:
        if os.environ.get("CROWDTRAIN_DEBUG"):
            raise
        errors.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} "
            "(set CROWDTRAIN_DEBUG=1 to see where; please report it)",
            highlight=False,
        )
        raise typer.Exit(1) from None


def _write_json(path: Path | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    console.print(f"wrote {path}")


def _round_table() -> tuple[Table, Callable[[Any], None]]:
    """A per-round table and the callback that adds a row to it."""
    table = Table(title="rounds")
    for col in ("round", "train loss", "eval loss", "contributions", "bytes up"):
        table.add_column(col, justify="right")

    def on_round(row: Any) -> None:
        table.add_row(
            str(row.round),
            f"{row.train_loss:.4f}",
            f"{row.eval_loss:.4f}",
            str(row.contributions),
            f"{row.bytes_up:,}",
        )

    return table, on_round


def _simulate_des(
    scenario: Scenario, run: RunConfig, json_path: Path | None, plot_dir: Path | None
) -> float:
    """A discrete-event scenario and its references (`sim.study`): rounds, then the report."""
    from crowdtrain.sim.report import PlotUnavailable, hms, plot_report, render_table
    from crowdtrain.sim.study import run_study

    table = Table(title="rounds (virtual time)")
    for col in ("round", "closed at", "duration", "contributions", "eval loss"):
        table.add_column(col, justify="right")
    rounds = scenario.report.method == "diloco"  # the other methods have no rounds
    with Live(table if rounds else "", console=console, auto_refresh=False) as live:

        def add_row(row: dict[str, Any]) -> None:
            table.add_row(
                str(row["round"]),
                hms(row["close_time_s"]),
                hms(row["duration_s"]),
                str(row["contributions"]),
                f"{row['eval_loss']:.4f}",
            )
            live.refresh()

        try:
            study = run_study(scenario, run, on_round=add_row)
        except RuntimeError as exc:
            if "stalled" not in str(exc):
                raise
            raise ConfigError(str(exc)) from None
    report = study.report
    if study.sim is not None:
        sim = study.sim
        console.print(
            f"eval loss {sim.initial_eval_loss:.4f} -> {sim.final_eval_loss:.4f} after "
            f"{len(sim.rounds)} rounds; virtual time to finish {hms(sim.virtual_time_s)} "
            f"({sim.virtual_time_s:,.0f} s)"
        )
    ddp = study.ddp
    if ddp is None:  # the analytic method: throughput, no loss curve
        _print_throughput(report)
        _write_json(json_path, study.to_json())
        return float(report["efficiency_vs_datacenter"])
    console.print(
        f"data-parallel reference: global batch {ddp.global_batch} sequences, lr {ddp.lr:g}, "
        f"{ddp.steps[-1]} proxy steps, eval loss {ddp.eval_loss[0]:.4f} -> {ddp.eval_loss[-1]:.4f}"
    )
    rows = render_table(report)
    summary = Table(title=f"time to eval loss {report['target_loss']:.4f} (virtual)")
    for col in rows[0]:
        summary.add_column(col, justify="right")
    for row in rows[1:]:
        summary.add_row(*row)
    console.print(summary)
    util = report["utilization"]
    sent = report["bytes_per_peer"]
    console.print(
        f"[bold]efficiency vs the datacenter ideal: {_fraction(report['efficiency_vs_datacenter'])}"
        f"[/bold] (ddp-wan: {_fraction(report['ddp_wan_efficiency'])}); utilization per peer: "
        f"median {util['median']:.3f}, min {util['min']:.3f}, max {util['max']:.3f}; bytes per "
        f"peer (median) {(sent['median'] or 0) / 1e9:.2f} GB"
    )
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    if plot_dir is not None:
        try:
            for path in plot_report(report, plot_dir):
                console.print(f"wrote {path}")
        except PlotUnavailable as exc:
            console.print(f"[yellow]{exc}[/yellow]")
    _write_json(json_path, study.to_json())
    eff = report["efficiency_vs_datacenter"]
    return math.nan if eff is None else float(eff)


def _print_throughput(report: dict[str, Any]) -> None:
    """The analytic method's steady state (`sim.analytic`), labelled as extrapolated."""
    from crowdtrain.sim.report import hms

    t = report["throughput"]
    console.print(
        f"[bold]extrapolated analytically[/bold] (not simulated peer by peer): about "
        f"{t['online_peers']:,.0f} peers online, rounds of {hms(t['round_s'])} with "
        f"{t['contributors_per_round']:,.0f} contributions, {t['tokens_per_s']:.3g} target "
        f"tokens/s, coordinator-bound: {'yes' if t['coordinator_bound'] else 'no'}"
    )
    util = report["utilization"]
    console.print(
        f"[bold]efficiency vs the datacenter ideal (systems part only): "
        f"{_fraction(report['efficiency_vs_datacenter'])}[/bold] (ddp-wan: "
        f"{report['ddp_wan_efficiency']:.2g}); utilization per online peer: median "
        f"{util['median']:.3f}, mean {util['mean']:.3f}; bytes per peer and round "
        f"{t['bytes_per_peer_per_round'] / 1e9:.2f} GB"
    )
    for note in report["notes"]:
        console.print(f"note: {note}")


def _fraction(x: float | None) -> str:
    return "n/a (the target was not reached)" if x is None else f"{x:.3f}"


def _simulate(
    scenario_name: str,
    json_path: Path | None,
    rounds: int | None,
    attack: str | None = None,
    attackers: int | None = None,
    plot_dir: Path | None = None,
    seed: int | None = None,
) -> float:
    from crowdtrain.sim.scenario import check_attack, load_scenario
    from crowdtrain.sim.swarm import run_swarm

    scenario = load_scenario(scenario_name)
    run = scenario.run
    if rounds is not None:
        run = run.model_copy(update={"rounds": run.rounds.model_copy(update={"total": rounds})})
    if seed is not None:
        run = run.model_copy(update={"seed": seed})
    if scenario.discrete_event:
        if attack or attackers:
            raise ConfigError(
                f"--attack is not supported for discrete-event scenarios such as "
                f"{scenario.name} yet; use an in-process swarm scenario such as smoke"
            )
        assert scenario.population is not None and scenario.target is not None
        target = scenario.target.target(run.codec)
        k = target.steps_per_proxy_step
        budget = (
            f"{run.inner.steps} proxy steps (H_target = {run.inner.steps * k:g})"
            if run.inner.budget == "steps"
            else f"{run.inner.seconds:g} s of compute"
        )
        console.print(
            f"scenario [bold]{scenario.name}[/bold] (discrete-event, {scenario.report.method}): "
            f"{scenario.population.peers} peers, {run.rounds.total} rounds of {budget}, "
            f"target {target.params:.3g} params, {k:g} target steps per proxy step, proxy "
            f"{run.model.arch} width {run.model.width} depth {run.model.depth}, codec "
            f"{run.codec.name}, churn {'on' if scenario.churn.enabled else 'off'}, "
            f"config {config_hash(run)[:12]}"
        )

        return _simulate_des(scenario, run, json_path, plot_dir)
    if plot_dir is not None:
        raise ConfigError(
            f"--plot applies to discrete-event scenarios; {scenario.name} is an in-process swarm"
        )
    attack = attack or scenario.swarm.attack
    if attackers is None:
        attackers = scenario.swarm.attackers or (1 if attack else 0)
    try:
        check_attack(attack, attackers, scenario.swarm.peers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if scenario.swarm.seeds > scenario.swarm.peers - attackers:
        raise ConfigError(
            f"swarm.seeds ({scenario.swarm.seeds}) must be honest volunteers: at most "
            f"{scenario.swarm.peers - attackers}"
        )
    if attack:
        console.print(f"attack [bold]{attack}[/bold] by {attackers} of the volunteers")
    console.print(
        f"scenario [bold]{scenario.name}[/bold]: {scenario.swarm.peers} volunteers, "
        f"{run.rounds.total} rounds of {run.inner.steps} steps, {run.model.arch} "
        f"width {run.model.width} depth {run.model.depth}, codec {run.codec.name}, "
        f"aggregation {run.aggregation.method}, config {config_hash(run)[:12]}"
    )
    table, on_round = _round_table()
    with Live(table, console=console, auto_refresh=False) as live:

        def show(row: Any) -> None:
            on_round(row)
            live.refresh()

        result = run_swarm(
            run,
            scenario.swarm.peers,
            attack=attack,
            attackers=attackers,
            seeds=scenario.swarm.seeds,
            eval_batch_count=scenario.swarm.eval_batches,
            eval_batch_size=scenario.swarm.eval_batch_size,
            on_round=show,
        )
    console.print(
        f"eval loss {result.initial_eval_loss:.4f} -> {result.final_eval_loss:.4f} "
        f"after {len(result.rounds)} rounds"
    )
    if result.diverged:
        console.print(f"training diverged and the run stopped: {result.diverged}")
    if run.defence.enabled:
        banned = ", ".join(f"{p} ({why})" for p, why in result.banned.items()) or "none"
        console.print(f"flagged at least once: {', '.join(result.flagged) or 'none'}")
        console.print(f"banned: {banned}")
    _write_json(json_path, result.to_json())
    return result.final_eval_loss - result.initial_eval_loss


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="Built-in scenario name or a TOML file.")] = "smoke",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override the round count.")] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=2**31 - 1,
            help="Override the run's seed: the model's start, the data order and, for a "
            "discrete-event scenario, its peers and their comings and goings.",
        ),
    ] = None,
    attack: Annotated[
        str | None, typer.Option(help="An attack from crowdtrain.adversary (docs/SECURITY.md).")
    ] = None,
    attackers: Annotated[
        int | None, typer.Option(min=1, help="How many volunteers attack (default 1).")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write PNG plots here (discrete-event scenarios; needs [plot] extra)."),
    ] = None,
) -> None:
    """Run a scenario through the protocol core and print each round.

    An in-process swarm scenario trains its volunteers in lockstep; a discrete-event scenario
    (one with [population] and [target] tables) runs them on a virtual clock with the target
    model's compute and transfer times, then measures it against the data-parallel datacenter
    ideal and DDP over the volunteers' links (docs/SIMULATIONS.md).
    """
    with _friendly_errors():
        _simulate(scenario, json_path, rounds, attack, attackers, plot, seed)


def _print_demo(doc: dict[str, Any], attack: str | None) -> None:
    """The demo's closing summary: a volunteers table and the loss it reached."""
    console.print()
    table = Table(title="volunteers")
    cols = ("volunteer", "samples", "bytes up", "bytes down", "utilization", "spot-checks")
    for col in cols + (("banned",) if attack else ()):
        table.add_column(col, justify="right")
    for v in doc["volunteers"]:
        table.add_row(
            v["name"],
            f"{v['samples']:,}",
            f"{v['bytes_up']:,}",
            f"{v['bytes_down']:,}",
            f"{v['utilization']:.1%}",
            str(v["verified"]),
            *(("yes" if v["banned"] else "",) if attack else ()),
        )
    console.print(table)
    console.print(
        f"eval loss {doc['eval_loss_start']:.4f} -> {doc['eval_loss_end']:.4f} over "
        f"{doc['rounds_completed']} rounds in {doc['wall_s']:.0f} s; "
        f"state and model in {doc['state_dir']}"
    )
    if attack is not None:
        banned = doc["banned"]
        console.print(
            "banned: "
            + (", ".join(f"{n} ({why})" for n, why in banned.items()) if banned else "none")
        )
    console.print(f"take the model home: crowdtrain export --state {doc['state_dir']} --out model/")


@app.command()
def demo(
    volunteers: Annotated[int, typer.Option(min=1, max=32, help="Volunteer processes.")] = 4,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to train.")] = 16,
    round_seconds: Annotated[float, typer.Option(min=0.5, help="Compute budget per round.")] = 6.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    attack: Annotated[
        str | None,
        typer.Option(help="Make some volunteers attack: an attack from crowdtrain.adversary."),
    ] = None,
    attackers: Annotated[
        int | None, typer.Option(min=1, help="How many volunteers attack (default 1).")
    ] = None,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the coordinator and dashboard up after the run (Ctrl-C).")
    ] = False,
    wandb: WandbFlag = False,
    tensorboard: TensorboardDir = None,
) -> None:
    """The main demo: a coordinator and volunteer processes on loopback behind emulated WAN,
    with the dashboard at the URL it prints."""
    from crowdtrain.demo import run_demo

    def report(doc: dict[str, Any]) -> None:
        _print_demo(doc, attack)
        _write_json(json_path, doc)

    from crowdtrain.server.tracking import check_installed

    with _friendly_errors():
        check_installed(wandb=wandb, tensorboard=tensorboard is not None)
        serve_args = (("--wandb",) if wandb else ()) + (
            ("--tensorboard", str(tensorboard.resolve())) if tensorboard else ()
        )
        doc = run_demo(
            volunteers=volunteers,
            rounds=rounds,
            round_seconds=round_seconds,
            attack=attack,
            attackers=attackers,
            console=console,
            keep_serving=report if keep_serving else None,
            serve_args=serve_args,
        )
        if not keep_serving:
            report(doc)
    # Outside _friendly_errors, which would take typer.Exit (an Exception) for a bug.
    if not doc["finished"]:
        errors.print("[red]the run did not finish[/red]")
        raise typer.Exit(1)
    if doc["eval_loss_end"] >= doc["eval_loss_start"]:
        errors.print("[red]the eval loss did not fall[/red]")
        raise typer.Exit(1)


def _read_token(path: Path | None) -> str | None:
    """The identity token in PATH (one line, at most 8 KB), or None without a path."""
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(8193)
    except OSError as exc:
        raise ConfigError(f"cannot read the identity token {path}: {exc.strerror}") from None
    token = raw.decode("utf-8", "replace").strip()
    if not token or len(raw) > 8192 or any(c.isspace() for c in token):
        raise ConfigError(f"{path} does not hold one identity token (one line, at most 8 KB)")
    return token


def _admission(**options: Any) -> AdmissionConfig:
    """The serve options' AdmissionConfig, or ConfigError saying what is wrong."""
    from pydantic import ValidationError

    try:
        door = AdmissionConfig(**options)
    except ValidationError as exc:
        raise ConfigError(
            "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        ) from None
    if door.identity_key is not None and not door.identity_key.is_file():
        raise ConfigError(f"--identity-key: no file {door.identity_key}")
    return door


#: The coordinator's admission defaults (`serve`'s door options show and override them).
_DOOR = AdmissionConfig()


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="Run config TOML (default: built-ins).")
    ] = None,
    state: Annotated[Path, typer.Option(help="State directory (created if missing).")] = Path(
        "runs/default"
    ),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 picks a free one).")] = 8000,
    invite: Annotated[
        str | None,
        typer.Option(help="Require this invite key to register.", envvar="CROWDTRAIN_INVITE"),
    ] = None,
    seed_invite: Annotated[
        str | None,
        typer.Option(
            help="Volunteers who register with this key (16+ characters) start established: "
            "the organizer's own machines, a reference sybils cannot outvote.",
            envvar="CROWDTRAIN_SEED_INVITE",
        ),
    ] = None,
    register_burst: Annotated[
        int,
        typer.Option(min=0, help="Registrations one address may make at once (0: no limit)."),
    ] = _DOOR.address_burst,
    register_per_hour: Annotated[
        float, typer.Option(min=0.0, help="Then this many per hour from one address.")
    ] = _DOOR.address_per_hour,
    admit_burst: Annotated[
        int,
        typer.Option(min=0, help="New volunteers admitted at once, all addresses (0: no limit)."),
    ] = _DOOR.global_burst,
    admit_per_minute: Annotated[
        float, typer.Option(min=0.0, help="Then this many per minute, all addresses.")
    ] = _DOOR.global_per_minute,
    pow_bits: Annotated[
        int,
        typer.Option(
            min=0,
            max=32,
            help="Ask each new volunteer for a hashcash proof of work of this many bits "
            "(20: about a second of one core; 0: none).",
        ),
    ] = 0,
    identity_key: Annotated[
        Path | None,
        typer.Option(help="Admit only holders of a JWT signed by this PEM public key."),
    ] = None,
    identity_issuer: Annotated[
        str | None, typer.Option(help="The identity tokens' issuer (iss).")
    ] = None,
    identity_audience: Annotated[
        str | None, typer.Option(help="The identity tokens' audience (aud).")
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            help="The dashboard's admin token (default: generated into <state>/admin.token).",
            envvar="CROWDTRAIN_ADMIN_TOKEN",
        ),
    ] = None,
    wandb: WandbFlag = False,
    tensorboard: TensorboardDir = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Threads for the work on each contribution as it arrives (norms, fingerprints, "
            "scores) and for the close's aggregation.",
        ),
    ] = 1,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="Serve HTTPS with this PEM certificate (chain); needs --tls-key."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="The unencrypted PEM private key of --tls-cert."),
    ] = None,
) -> None:
    """Run the coordinator: the HTTP API over the round protocol, the dashboard at / and
    Prometheus metrics at /metrics, with state under --state (HTTPS with --tls-cert/--tls-key)."""
    from crowdtrain.server.serve import listen, tls_files
    from crowdtrain.server.tracking import open_trackers

    with _friendly_errors():
        tls = tls_files(tls_cert, tls_key)
        cfg = load_config(config)
        door = _admission(
            invite=invite,
            seed_invite=seed_invite,
            address_burst=register_burst,
            address_per_hour=register_per_hour,
            global_burst=admit_burst,
            global_per_minute=admit_per_minute,
            pow_bits=pow_bits,
            identity_key=identity_key,
            identity_issuer=identity_issuer,
            identity_audience=identity_audience,
        )
        trackers = open_trackers(
            wandb=wandb,
            tensorboard=tensorboard,
            run_name=cfg.name,
            config=cfg.model_dump(mode="json"),
        )
        try:
            listening = listen(
                cfg,
                state,
                host=host,
                port=port,
                admission=door,
                admin=admin_token,
                trackers=trackers,
                announce=console.print,
                workers=workers,
                tls=tls,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        listening.run()


@app.command()
def join(
    url: Annotated[
        str, typer.Argument(help="The coordinator's URL, e.g. https://organizer.example:8000")
    ],
    name: Annotated[str | None, typer.Option(help="Your name on the leaderboard.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for training.")] = None,
    max_upload_mbps: Annotated[
        float | None, typer.Option(min=0.01, help="Cap your upload rate (Mbit/s).")
    ] = None,
    invite: Annotated[str | None, typer.Option(help="Invite key, if the run needs one.")] = None,
    identity_token: Annotated[
        Path | None,
        typer.Option(
            help="A file holding your token from the run's identity provider, if it uses one.",
            envvar="CROWDTRAIN_IDENTITY_TOKEN_FILE",
        ),
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option(min=1, help="Leave after this many rounds.")
    ] = None,
    summary: Annotated[
        Path | None, typer.Option(help="Write a JSON summary here at the end.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No live display (for scripts).")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where downloaded weights and shards are cached.")
    ] = None,
    slowdown: Annotated[float, typer.Option(min=1.0, hidden=True)] = 1.0,
    attack: Annotated[
        str | None,
        typer.Option(
            help="For testing defences: behave as this attack from crowdtrain.adversary "
            "(seeing only its own update: ALIE and IPM use it, copycat sends it)."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow plain http:// to another machine (your token and the model then "
            "travel unprotected); loopback needs no flag."
        ),
    ] = False,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            help="Also trust the certificate authorities in this PEM file (a coordinator "
            "with its own or a self-signed certificate)."
        ),
    ] = None,
) -> None:
    """Donate compute: join a run and train until it ends (Ctrl-C stops cleanly)."""
    from crowdtrain.client.api import PeerBanned
    from crowdtrain.client.run import run_volunteer

    banned: PeerBanned | None = None
    with _friendly_errors():
        try:
            run_volunteer(
                url,
                name=name,
                device=device,
                threads=threads,
                max_upload_mbps=max_upload_mbps,
                invite=invite,
                identity=_read_token(identity_token),
                max_rounds=max_rounds,
                summary=summary,
                quiet=quiet,
                slowdown=slowdown,
                cache_dir=cache_dir,
                console=console,
                attack=attack,
                insecure=insecure,
                ca_cert=ca_cert,
            )
        except PeerBanned as exc:
            banned = exc
    if banned is not None:  # outside _friendly_errors: typer.Exit is an Exception
        errors.print(f"[red]stopped:[/red] {banned}", highlight=False)
        raise typer.Exit(1)


@data_app.command("pack")
def data_pack(
    source: Annotated[str, typer.Argument(help="A file, a directory, or 'stdlib'.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards + manifest.")],
    include: Annotated[
        list[str] | None, typer.Option(help="Glob on file names (repeatable); default *.py.")
    ] = None,
    shard_bytes: Annotated[int, typer.Option(min=1024, help="Bytes per shard.")] = 1 << 20,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.02,
) -> None:
    """Pack text into fixed-size content-addressed shards with a JSON manifest."""
    from crowdtrain.data import pack_source

    with _friendly_errors():
        manifest = pack_source(
            source,
            out,
            include=tuple(include or ("*.py",)),
            shard_bytes=shard_bytes,
            val_fraction=val_fraction,
        )
        console.print(
            f"packed {manifest.total_bytes:,} bytes into {len(manifest.train_ids)} training and "
            f"{len(manifest.val_ids)} validation shards in {out} (manifest {manifest.hash()[:12]})"
        )


@bench_app.command("algo")
def bench_algo(
    quick: Annotated[bool, typer.Option(help="The small setting (< 10 min on 2 cores).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Runs at a time.")] = 2,
    frontier: Annotated[
        bool, typer.Option(help="Eval loss against bytes for every H and codec instead.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="With --frontier: write the frontier's PNG here.")
    ] = None,
    inner_steps: Annotated[
        int | None,
        typer.Option(
            "--inner-steps", min=1, help="DiLoCo's H (inner steps per round); the setting's own."
        ),
    ] = None,
) -> None:
    """Single worker vs synchronous data-parallel vs DiLoCo (fp32, int8, top-k) on one corpus,
    each at its best inner learning rate, over several seeds."""
    from crowdtrain.benchmarks import algo
    from crowdtrain.sim.report import PlotUnavailable

    def log(line: str) -> None:
        console.print(line, highlight=False)

    with _friendly_errors():
        if plot is not None and not frontier:
            raise ConfigError("--plot draws the frontier: use it with --frontier")
        if inner_steps is not None and frontier:
            raise ConfigError("--inner-steps picks one H; the frontier runs every H")
        if frontier:
            doc = algo.run_frontier(quick=quick, jobs=jobs, log=log)
            console.print(algo.frontier_table(doc), highlight=False, markup=False)
            _write_json(json_path, doc)
            if plot is not None:
                try:
                    console.print(f"wrote {algo.plot_frontier(doc, plot)}")
                except PlotUnavailable as exc:
                    console.print(f"[yellow]{exc}[/yellow]")
            return
        doc = algo.run_algo_bench(
            setting=algo.setting(quick=quick, inner_steps=inner_steps), jobs=jobs, log=log
        )
        table = Table(title="algorithm benchmark (each method at its best inner lr)")
        cols = ("method", "best lr", "eval loss (mean)", "spread", "÷ DDP", "bytes per worker")
        for col in cols:
            table.add_column(col, justify="right")
        for name, row in doc["methods"].items():
            ratio = row["vs_ddp"]
            table.add_row(
                name,
                "diverged" if row["best_lr"] is None else f"{row['best_lr']:g}",
                "—" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}",
                "—" if row["eval_loss_spread"] is None else f"{row['eval_loss_spread']:.4f}",
                "—"
                if ratio is None
                else f"{ratio['mean']:.3f} ({ratio['low']:.3f}–{ratio['high']:.3f})",
                f"{row['bytes_per_worker']:,}",
            )
        console.print(table)
        _write_json(json_path, doc)


@bench_app.command("robustness")
def bench_robustness(
    quick: Annotated[
        bool,
        typer.Option(
            help="The small setting (71 runs took 34 min on 2 cores; --attacks picks fewer)."
        ),
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Runs at a time.")] = 2,
    runs: Annotated[
        Path | None, typer.Option(help="Keep every run's JSON (with its verdicts) here.")
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(help="Only these attacks (comma-separated), with the clean references."),
    ] = None,
) -> None:
    """Every attack with the defences on and with a plain mean, against the clean run."""
    from crowdtrain.benchmarks.robustness import run_robustness_bench

    with _friendly_errors():
        doc = run_robustness_bench(
            quick=quick,
            jobs=jobs,
            runs_dir=runs,
            log=lambda line: console.print(line, highlight=False),
            attacks=None if attacks is None else [a.strip() for a in attacks.split(",") if a],
        )
        clean = doc["clean_eval_loss"]
        table = Table(title=f"robustness (clean run: eval loss {clean:.4f})")
        cols = (
            "attack",
            "attackers",
            "defended",
            "vs clean",
            "plain mean",
            "banned",
            "caught in round",
            "honest flagged",
        )
        for col in cols:
            table.add_column(col, justify="right")
        for row in doc["attacks"].values():
            sybils = row.get("sybils_per_honest")
            table.add_row(
                row["attack"] if sybils is None else f"{row['attack']} (sybils)",
                f"{row['fraction']:.0%}" if sybils is None else f"{sybils}× honest",
                f"{row['defended_eval_loss']:.4f}",
                f"{row['defended_eval_loss'] / clean - 1:+.1%}",
                f"{row['undefended_eval_loss']:.4f}",
                f"{row['attackers_banned']}/{row['attackers_total']}",
                f"{row['caught_in_round']:.0%}",
                str(row["honest_flagged"]),
            )
        console.print(table)
        console.print(f"spot-check overhead (clean run): {doc['spot_check_overhead']:.1%}")
        _write_json(json_path, doc)


@bench_app.command("overlap")
def bench_overlap(
    quick: Annotated[bool, typer.Option(help="Fewer, shorter rounds.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Volunteer compute utilization with overlap on and off, behind 20 Mbit/s, 100 ms links."""
    from crowdtrain.benchmarks.overlap import run_overlap_bench

    with _friendly_errors():
        doc = run_overlap_bench(quick=quick, console=console)
        _write_json(json_path, doc)


@bench_app.command("sim-validation")
def bench_sim_validation(
    quick: Annotated[bool, typer.Option(help="Two volunteers, fewer rounds.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """The networked system against the simulator with matching parameters (docs/SIMULATIONS.md)."""
    from crowdtrain.benchmarks.sim_validation import run_validation

    with _friendly_errors():
        doc = run_validation(quick=quick, console=console)
        _write_json(json_path, doc)


@bench_app.command("coordinator")
def bench_coordinator(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    params: Annotated[
        str, typer.Option(help="Model size: 10m, 100m or 1b (a byte-level GPT).")
    ] = "10m",
    contributions: Annotated[int, typer.Option(min=1, help="Contributions per round.")] = 32,
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            max=256,
            help="Coordinator worker threads (0: no on-arrival work, all screening at the "
            "close, on one thread).",
        ),
    ] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to time.")] = 3,
    state: Annotated[
        str,
        typer.Option(
            help="inner.optimizer_state: derived (the default, no model pass in the close) or "
            "published (the coordinator's gradients at the new θ).",
        ),
    ] = "derived",
    established: Annotated[
        bool,
        typer.Option(
            help="Every peer in good standing from the start (a run's steady state); by "
            "default all are newcomers, whose contributions are all scored.",
        ),
    ] = False,
) -> None:
    """Coordinator cost per round, phase by phase, for int8 contributions, against the floor
    of reading every payload once (docs/BENCHMARKS.md)."""
    from crowdtrain.benchmarks.coordinator import run_coordinator_bench

    with _friendly_errors():
        doc = run_coordinator_bench(
            params=params.lower(),
            contributions=contributions,
            workers=workers,
            rounds=rounds,
            log=lambda line: console.print(line, highlight=False),
            state=state,
            established=established,
        )
        _write_json(json_path, doc)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="A run config TOML file.")]) -> None:
    """Validate a run config and print its content hash."""
    with _friendly_errors():
        cfg = load_config(path)
        console.print(f"{path}: ok, config hash {config_hash(cfg)}")


@config_app.command("show")
def config_show(
    path: Annotated[Path | None, typer.Argument(help="A run config TOML file.")] = None,
) -> None:
    """Print the resolved config (defaults filled in) as JSON, and which settings were derived
    from the run rather than written in the file, and why."""
    with _friendly_errors():
        cfg = load_config(path)
        console.print_json(json.dumps(cfg.model_dump(mode="json")))
        for line in derived_settings(load_raw(path)):
            console.print(line, highlight=False, markup=False)


@app.command()
def export(
    state: Annotated[Path, typer.Option(help="The coordinator's state directory.")],
    out: Annotated[
        Path, typer.Option(help="Folder to write the model into (new or a previous export).")
    ],
    version: Annotated[
        int | None, typer.Option(min=0, help="Model version to export (default: the latest).")
    ] = None,
) -> None:
    """Write the run's model as safetensors + config.json with a model card (contributors by
    verified samples, manifest hash, data manifest)."""
    from crowdtrain.export import ExportError, export_model

    with _friendly_errors():
        try:
            done = export_model(state, out, version=version)
        except ExportError as exc:
            raise ConfigError(str(exc)) from None
        loss = "n/a" if done.eval_loss is None else f"{done.eval_loss:.4f}"
        console.print(
            f"exported version {done.version} (round {done.round}, eval loss {loss}) to "
            f"{done.out}: {', '.join(done.files)}; {done.contributors} contributors; "
            f"manifest {done.manifest_hash[:16]}"
        )


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="A folder written by `crowdtrain export`.")],
    prompt: Annotated[str, typer.Option(help="Text for the model to continue.")] = "def ",
    tokens: Annotated[int, typer.Option(min=1, max=100_000, help="Bytes to generate.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k likeliest.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed, the same text).")] = 0,
) -> None:
    """Generate text from an exported model: the prompt, then its continuation."""
    from crowdtrain.export import ExportError, load_exported
    from crowdtrain.models.generate import generate, printable

    with _friendly_errors():
        try:
            cfg, params = load_exported(model)
            text = generate(
                cfg, params, prompt, tokens, temperature=temperature, top_k=top_k, seed=seed
            )
        except (ExportError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        console.print(printable(prompt + text), markup=False, highlight=False)


def main() -> None:
    """Entry point with logging set up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
