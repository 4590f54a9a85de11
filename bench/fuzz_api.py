"""Schemathesis against the coordinator's live OpenAPI document, at volume (issue 18, 6b).

    .venv/bin/python bench/fuzz_api.py --requests 10000 [--json PATH] [--seed 0]

Builds an in-process coordinator (the tiny model of the server tests, an admin token, a
temporary state directory) and loads /v1/openapi.json from the running app with
`schemathesis.openapi.from_asgi`. Then, pass after pass (pass k seeds hypothesis with
SEED + k), for every operation in the document it generates up to --examples requests per
pass (schemathesis's positive and negative modes), and as many again for two targets a random
request cannot reach (byte ranges of the initial weights blob; contribution payloads under a
valid meta header), and sends each three times: as generated (no
valid token), with a registered volunteer's token and with the admin token. It stops after
the pass in which at least --requests requests were sent. One app serves the whole run, so
what earlier requests did (registrations, bans, pauses, rate limits) stays.

Every answer is counted by route and status, and checked: a 5xx, a status the document does
not list for that route, and a body that does not match the document's schema for that status
(schemathesis's `response_schema_conformance`) are each counted, and the first few are
printed with the request that caused them. Prints the totals, the table of routes and
statuses, the errors the coordinator logged and the wall time; --json writes them too. Exits 1
if any 5xx, undocumented status, nonconforming body or logged error was seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Err
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance

from crowdtrain.config import parse_config
from crowdtrain.server.app import create_app
from crowdtrain.server.coordinator import Coordinator

AnyCase = schemathesis.Case[Any]
AnyOperation = schemathesis.APIOperation[Any, Any, Any, Any]

ADMIN_TOKEN = "fuzz-admin-secret"
WORDS = ["def", "class", "return", "import", "self", "if", "else", "for", "in", "None", "(", ")"]
#: Failures printed in full (all are counted).
SHOW = 10
META = json.dumps({"base_version": 0, "samples": 8, "tokens": 256, "steps": 2, "train_loss": 5.0})


class ErrorLog(logging.Handler):
    """Counts the errors the coordinator logs (a 500's traceback, a failed round close)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.count <= SHOW:
            print(f"LOGGED {self.format(record)}", flush=True)


def write_corpus(path: Path, n_bytes: int = 100_000) -> Path:
    """About `n_bytes` of varied, deterministic Python-like lines (as the server tests use)."""
    rng = random.Random(1)
    lines: list[str] = []
    size = 0
    while size < n_bytes:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
        line = f"{'    ' * rng.randint(0, 2)}{words} v{len(lines) % 23} = {rng.randint(0, 999)}\n"
        lines.append(line)
        size += len(line)
    path.write_text("".join(lines))
    return path


def coordinator(tmp: Path) -> Coordinator:
    """The tiny run of tests/server (3 rounds, quorum 2), with an admin token."""
    config = parse_config(
        {
            "model": {"width": 32, "depth": 1, "heads": 2, "context": 32},
            "data": {
                "source": str(write_corpus(tmp / "corpus.py")),
                "dir": str(tmp / "data"),
                "shard_bytes": 8192,
                "val_fraction": 0.1,
                "batch_size": 4,
            },
            "inner": {"steps": 2},
            "rounds": {"total": 3, "quorum": 2, "deadline_s": 30},
            "defence": {"enabled": False},
        }
    )
    return Coordinator(config, tmp / "state", eval_batch_count=1, admin_token=ADMIN_TOKEN)


class Tally:
    """Answers by route and status, and the ones that break the document."""

    def __init__(self) -> None:
        self.by_route: Counter[tuple[str, int]] = Counter()
        self.requests = 0
        self.server_errors = 0
        self.undocumented = 0
        self.bad_bodies = 0
        self.shown = 0

    def show(self, what: str, case: AnyCase, identity: str, text: str) -> None:
        if self.shown < SHOW:
            self.shown += 1
            print(f"FAIL {what} ({identity}): {case.as_curl_command()}\n  -> {text[:500]}")

    def record(self, case: AnyCase, identity: str, headers: dict[str, str] | None) -> None:
        operation = case.operation
        route = f"{operation.method.upper()} {operation.path}"
        response = case.call(headers=headers)
        status = response.status_code
        self.requests += 1
        self.by_route[(route, status)] += 1
        documented = {int(code) for code in operation.definition.raw["responses"]}
        if status >= 500:
            self.server_errors += 1
            self.show(f"{status} on {route}", case, identity, response.text)
        if status not in documented:
            self.undocumented += 1
            self.show(f"undocumented {status} on {route}", case, identity, response.text)
        elif status < 500:
            try:
                case.validate_response(response, checks=[response_schema_conformance])
            except AssertionError as exc:
                self.bad_bodies += 1
                self.show(f"body of {status} on {route}", case, identity, str(exc))


def run(requests: int, examples: int, first_seed: int) -> dict[str, Any]:
    tally = Tally()
    errors = ErrorLog()
    # warnings (every admin action is one) stay quiet; errors are counted and shown
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(coordinator(Path(tmp)))
        schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app)
        client = TestClient(app)
        volunteer = client.post("/v1/register", json={"name": "fuzz-volunteer"}).json()
        client.post("/v1/work", headers={"Authorization": f"Bearer {volunteer['token']}"})
        identities: list[tuple[str, dict[str, str] | None]] = [
            ("anonymous", None),
            ("volunteer", {"Authorization": f"Bearer {volunteer['token']}"}),
            ("admin", {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
        ]
        targets: list[tuple[AnyOperation, dict[str, Any]]] = []
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                raise result.err()
            targets.append((result.ok(), {}))
        # Two that a random request never reaches: a real blob's byte ranges, and a payload
        # with a valid meta header (which reaches the decoder).
        sha = app.state.coordinator.manifest["manifest"]["initial_weights"]
        targets.append((schema["/v1/blobs/{sha}"]["GET"], {"path_parameters": {"sha": sha}}))
        targets.append(
            (
                schema["/v1/contributions/{round_number}"]["PUT"],
                {"path_parameters": {"round_number": 0}, "headers": {"X-Crowdtrain-Meta": META}},
            )
        )
        passes = 0
        try:
            while tally.requests < requests:
                for operation, fixed in targets:
                    cases = operation.as_strategy(
                        GenerationMode.POSITIVE, **fixed
                    ) | operation.as_strategy(GenerationMode.NEGATIVE, **fixed)

                    @seed(first_seed + passes)
                    @settings(
                        max_examples=examples,
                        deadline=None,
                        database=None,
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=cases)
                    def each(case: AnyCase) -> None:
                        for identity, headers in identities:
                            tally.record(case, identity, headers)

                    each()
                passes += 1
                print(f"pass {passes}: {tally.requests} requests so far", flush=True)
        finally:
            shutdown_lifespans()
    wall = time.perf_counter() - started
    return {
        "requests": tally.requests,
        "passes": passes,
        "examples_per_operation_per_pass": examples,
        "seed": first_seed,
        "server_errors": tally.server_errors,
        "undocumented_statuses": tally.undocumented,
        "nonconforming_bodies": tally.bad_bodies,
        "errors_logged": errors.count,
        "wall_s": round(wall, 1),
        "by_route_and_status": {
            f"{route} {status}": n for (route, status), n in sorted(tally.by_route.items())
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=10_000, help="send at least this many")
    ap.add_argument("--examples", type=int, default=100, help="per operation and pass")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first pass")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    doc = run(args.requests, args.examples, args.seed)
    print(f"{'route':48} {'status':>6} {'requests':>9}")
    for key, n in doc["by_route_and_status"].items():
        route, status = key.rsplit(" ", 1)
        print(f"{route:48} {status:>6} {n:>9}")
    print(
        f"requests {doc['requests']} in {doc['passes']} passes, wall {doc['wall_s']} s; "
        f"5xx {doc['server_errors']}; undocumented statuses {doc['undocumented_statuses']}; "
        f"nonconforming bodies {doc['nonconforming_bodies']}; "
        f"errors logged {doc['errors_logged']}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = (
        doc["server_errors"]
        or doc["undocumented_statuses"]
        or doc["nonconforming_bodies"]
        or doc["errors_logged"]
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
