"""`crowdtrain join`: probe the machine, join the run, and show live progress until it ends.

The volunteer rides through coordinator restarts and network drops on its own: every request
retries with exponential back-off and jitter (see transfer.py). Ctrl-C (SIGINT) or SIGTERM stops
it cleanly after the current step. A volunteer the coordinator has banned stops at once with
the coordinator's one-sentence reason (`PeerBanned`), without retrying.
"""

from __future__ import annotations

import secrets
import signal
import threading
from pathlib import Path
from types import FrameType

import platformdirs
from rich.console import Console
from rich.live import Live
from rich.table import Table

from crowdtrain.adversary import ATTACKS
from crowdtrain.client.api import CoordinatorApi
from crowdtrain.client.probe import probe_device
from crowdtrain.client.transfer import ClientError, RetryPolicy, Stopped
from crowdtrain.client.volunteer import JoinOptions, Volunteer, VolunteerStats, write_summary


def _view(stats: VolunteerStats) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_row("volunteer", f"{stats.name} ({stats.peer_id})")
    table.add_row("status", stats.status)
    table.add_row("round / step", f"{stats.round} / {stats.step}")
    table.add_row("loss", f"{stats.loss:.4f}")
    table.add_row("samples contributed", f"{stats.samples:,} in {stats.rounds} rounds")
    table.add_row("bytes up / down", f"{stats.bytes_up:,} / {stats.bytes_down:,}")
    table.add_row("spot-checks replayed", f"{stats.verified} ({stats.verify_steps:,} steps)")
    table.add_row(
        "last transfer rate", f"up {stats.up_mbps:.1f} Mbit/s, down {stats.down_mbps:.1f} Mbit/s"
    )
    table.add_row("compute utilization", f"{stats.utilization():.1%}")
    return table


def run_volunteer(
    url: str,
    *,
    name: str | None,
    device: str,
    threads: int | None,
    max_upload_mbps: float | None,
    invite: str | None,
    max_rounds: int | None,
    identity: str | None = None,
    summary: Path | None,
    quiet: bool,
    slowdown: float,
    console: Console,
    cache_dir: Path | None = None,
    attack: str | None = None,
    insecure: bool = False,
    ca_cert: Path | None = None,
) -> VolunteerStats:
    """Join the run at `url` and work until it finishes or the user stops it.

    ATTACK (for testing defences) makes this volunteer behave as that attack of
    `crowdtrain.adversary`. INSECURE allows plain http:// to another machine; CA_CERT is a
    PEM file of extra certificate authorities to trust (see `CoordinatorApi`). Raises
    PeerBanned if the coordinator bans this volunteer (the summary is written first).
    """
    if attack is not None and attack not in ATTACKS:
        raise ClientError(f"unknown attack {attack!r}; the attacks are {', '.join(ATTACKS)}")
    stop = threading.Event()
    api = CoordinatorApi(  # checks the URL and the CA file before anything else
        url, policy=RetryPolicy(max_delay=10.0), stop=stop, insecure=insecure, ca_cert=ca_cert
    )
    info = probe_device(device, threads)
    options = JoinOptions(
        url=url.rstrip("/"),
        # names are unique in a run: a default one gets a random suffix
        name=name or f"{info.kind}-volunteer-{secrets.token_hex(3)}",
        device=info,
        cache_dir=cache_dir or Path(platformdirs.user_cache_dir("crowdtrain")) / "blobs",
        invite=invite,
        identity=identity,
        max_upload_mbps=max_upload_mbps,
        slowdown=slowdown,
        attack=attack,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    volunteer = Volunteer(options, api)
    try:
        volunteer.join()
        console.print(
            f"joined {options.url} as {options.name} ({volunteer.stats.peer_id}) on "
            f"{info.kind} with {info.threads} threads"
            + (f", behaving as the attack {attack}" if attack else "")
        )
        if quiet:
            volunteer.run(stop, max_rounds)
        else:
            with Live(_view(volunteer.stats), console=console, refresh_per_second=4) as live:
                volunteer.on_update = lambda s: live.update(_view(s))
                volunteer.run(stop, max_rounds)
    except Stopped:  # Ctrl-C or SIGTERM arrived while a transfer was waiting: a clean stop
        console.print("stopped")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if summary is not None:
            write_summary(summary, volunteer.stats)
    stats = volunteer.stats
    console.print(
        f"done: {stats.samples:,} samples in {stats.rounds} rounds, "
        f"utilization {stats.utilization():.1%}"
    )
    return stats
