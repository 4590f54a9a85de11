"""Export a trained model from a coordinator's state directory, and load an export back.

An export is a directory that stands on its own: the weights θ of one version (safetensors),
a `config.json` that names the built-in architecture, the data manifest and the run manifest that
pinned the run (DESIGN.md, "Trust model"), and a model card (`README.md`, after Mitchell et al.
2019, "Model Cards for Model Reporting") that credits the volunteers by their *verified samples*:
the samples of their contributions that were actually aggregated into a version, the DiLoCo outer
step of Douillard et al. 2023 (arXiv:2311.08105).

Exporting only reads the run. The SQLite state store is checked read-only before it is opened,
so a missing, foreign or differently versioned file is refused rather than created or migrated;
no data is re-packed and no corpus is needed. The run manifest is the signed one the
coordinator stores (document key "manifest") every time it starts.

Loading an export never unpickles anything: JSON and safetensors only, checked against the
architecture's parameter shapes.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save

from crowdtrain import strictjson
from crowdtrain.client.signing import (
    manifest_hash,
    signature_is_valid,
)
from crowdtrain.config import ModelConfig, RunConfig, config_hash
from crowdtrain.data import DataError, DataManifest
from crowdtrain.data.atomic import atomic_write_bytes
from crowdtrain.models import count_params, param_shapes
from crowdtrain.models.generate import printable
from crowdtrain.store import (
    ContributionRow,
    DirBlobStore,
    SqliteStateStore,
    StoreError,
    VersionRow,
)
from crowdtrain.store.schema import SCHEMA_VERSION

FORMAT = "crowdtrain-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DATA_MANIFEST = "data_manifest.json"
RUN_MANIFEST = "manifest.json"
CARD = "README.md"
# config.json goes last: it names the weights' hash, so a torn re-export is detected on load.
FILES = (WEIGHTS, DATA_MANIFEST, RUN_MANIFEST, CARD, CONFIG)
STATE_FILE = "state.sqlite"
BLOBS_DIR = "blobs"
MANIFEST_DOC = "manifest"
MAX_CONFIG_BYTES = 1 << 20
MAX_NAME_CHARS = 64
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#~!"})


class ExportError(ValueError):
    """A state directory or an export is unusable; the message is one sentence for a person."""


@dataclass(frozen=True)
class ExportSummary:
    """What `export_model` wrote."""

    out: Path
    version: int
    round: int
    eval_loss: float | None
    files: tuple[str, ...]
    contributors: int
    manifest_hash: str
    signed: bool


@dataclass
class Contributor:
    """One volunteer's record in the rounds that built the exported version."""

    name: str
    verified_samples: int = 0
    verified_tokens: int = 0
    accepted: int = 0
    rejected: int = 0
    banned: bool = False


# --- reading the state directory ---------------------------------------------------------------


def _check_state(state: Path) -> None:
    """Refuse what is not an existing crowdtrain state directory, without writing anything."""
    if not state.is_dir():
        raise ExportError(f"there is no state directory at {state}; pass the coordinator's --state")
    db = state / STATE_FILE
    if not db.is_file() or not (state / BLOBS_DIR).is_dir():
        raise ExportError(
            f"{state} is not a crowdtrain state directory (it needs {STATE_FILE} and {BLOBS_DIR}/)"
        )
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        row = None
    if row is None:
        raise ExportError(f"{db} is not a crowdtrain state store")
    if str(row[0]) != str(SCHEMA_VERSION):
        raise ExportError(
            f"{db} has schema version {row[0]} but this crowdtrain reads version "
            f"{SCHEMA_VERSION}; export with the crowdtrain that ran the coordinator"
        )


def _run_config(store: SqliteStateStore) -> RunConfig:
    raw = store.get_json("config")
    if raw is None:
        raise ExportError("the state store holds no run config; the coordinator never started")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError:
        raise ExportError("the run config in the state store does not parse") from None
    stored = store.get_json("config_hash")
    if stored is not None and stored != config_hash(config):
        raise ExportError("the run config in the state store does not match its stored hash")
    return config


def _stored_manifest(
    doc: Any, config: RunConfig, initial: VersionRow
) -> tuple[dict[str, Any], DataManifest]:
    """The signed manifest document the coordinator stored, checked against the run."""
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(manifest, dict) or doc.get("hash") != manifest_hash(manifest):
        raise ExportError("the run manifest in the state store does not match its hash")
    if "signature" in doc and not signature_is_valid(
        str(doc["hash"]), str(doc.get("signature")), str(doc.get("public_key"))
    ):
        raise ExportError("the run manifest in the state store has an invalid signature")
    if manifest.get("config_hash") != config_hash(config):
        raise ExportError("the run manifest in the state store pins a different config")
    if manifest.get("initial_weights") != initial.weights_sha:
        raise ExportError("the run manifest in the state store pins different initial weights")
    try:
        data = DataManifest.from_json(manifest.get("data"))
    except DataError as exc:
        raise ExportError(f"the data manifest inside the run manifest is invalid: {exc}") from None
    return dict(doc), data


def _weights(blobs: DirBlobStore, row: VersionRow, config: RunConfig) -> dict[str, torch.Tensor]:
    if not blobs.has(row.weights_sha):
        raise ExportError(
            f"the weights of version {row.version} (blob {row.weights_sha[:12]}) are missing"
        )
    raw = blobs.read(row.weights_sha)
    if hashlib.sha256(raw).hexdigest() != row.weights_sha:
        raise ExportError(f"the weights blob of version {row.version} is damaged")
    try:
        tensors = dict(load_safetensors(raw))
    except SafetensorError:
        raise ExportError(f"the weights blob of version {row.version} is not safetensors") from None
    _check_shapes(tensors, config.model, f"the weights of version {row.version}")
    return tensors


def _check_shapes(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, what: str) -> None:
    shapes = param_shapes(cfg)
    if set(tensors) != set(shapes):
        odd = sorted(set(tensors) ^ set(shapes))[0]
        raise ExportError(f"{what} do not fit the {cfg.arch} model: tensor {odd!r} differs")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ExportError(
                f"{what} do not fit the {cfg.arch} model: tensor {name!r} has shape "
                f"{tuple(t.shape)} ({t.dtype}), expected {shape}"
            )


def _contributors(store: SqliteStateStore, versions: list[VersionRow]) -> list[Contributor]:
    """Every volunteer seen in the rounds of `versions`, ranked by verified samples."""
    peers = {p.peer_id: p for p in store.list_peers()}
    last_round = max((v.round for v in versions), default=-1)
    rows = {rnd: store.contributions_for_round(rnd) for rnd in range(last_round + 1)}
    table: dict[str, Contributor] = {}

    def entry(peer_id: str) -> Contributor:
        if peer_id not in table:
            peer = peers.get(peer_id)
            table[peer_id] = Contributor(
                name=peer.name if peer else "(unknown)",
                banned=bool(peer and peer.banned),
            )
        return table[peer_id]

    accepted: dict[tuple[str, int], ContributionRow] = {}
    for rnd, contributions in rows.items():
        for c in contributions:
            e = entry(c.peer_id)
            if c.status == "accepted":
                e.accepted += 1
                accepted[(c.peer_id, rnd)] = c
            else:
                e.rejected += 1
    counted: set[tuple[str, int]] = set()
    for v in versions:
        ids = v.metrics.get("contributors") or []
        weights = v.metrics.get("weights") or [1.0] * len(ids)
        for peer_id, weight in zip(ids, weights, strict=False):
            if not (isinstance(weight, int | float) and weight > 0):
                continue
            # A late contribution to the previous round is aggregated with this round's.
            for key in ((peer_id, v.round), (peer_id, v.round - 1)):
                if key in accepted and key not in counted:
                    counted.add(key)
                    e = entry(peer_id)
                    e.verified_samples += accepted[key].samples
                    e.verified_tokens += accepted[key].tokens
                    break
    return sorted(
        table.values(),
        key=lambda e: (-e.verified_samples, -e.accepted, e.rejected, e.name),
    )


# --- the model card ----------------------------------------------------------------------------


def _md(text: str) -> str:
    """A person-chosen name, safe inside a Markdown table cell."""
    text = printable(text).replace("\n", " ").replace("\t", " ")
    if len(text) > MAX_NAME_CHARS:
        text = text[: MAX_NAME_CHARS - 1] + "…"
    return text.translate(_MARKDOWN) or "(no name)"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _card(
    *,
    out: Path,
    config: RunConfig,
    row: VersionRow,
    initial_loss: float | None,
    data: DataManifest,
    mhash: str,
    signed: bool,
    people: list[Contributor],
) -> str:
    m = config.model
    shape = f"width {m.width}, depth {m.depth}, "
    shape += f"heads {m.heads}, " if m.arch == "gpt" else ""
    shape += f"MLP ratio {m.mlp_ratio}, context {m.context} bytes, vocabulary {m.vocab_size}"
    tokens = sum(p.verified_tokens for p in people)
    samples = sum(p.verified_samples for p in people)
    lines = [
        f"# {_md(config.name)}",
        "",
        f"A byte-level `{m.arch}` language model trained with crowdtrain: volunteers trained it "
        "together over ordinary internet links in DiLoCo rounds.",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | `{m.arch}`: {shape} |",
        f"| Parameters | {count_params(m):,} |",
        f"| Version | {row.version} ({row.version} rounds trained) |",
        f"| Eval loss | {_loss(strictjson.finite_or_none(row.metrics.get('eval_loss')))} "
        f"(initial {_loss(initial_loss)}) |",
        f"| Verified samples | {samples:,} ({tokens:,} tokens) |",
        f"| Run manifest hash | `{mhash}`{'' if signed else ' (unsigned)'} |",
        f"| Config hash | `{config_hash(config)}` |",
        "",
        "## Training data",
        "",
        f"- Source: {_md(data.source)} (files matching {_md(', '.join(data.include))})",
        f"- Shards: {len(data.train)} for training, {len(data.val)} for validation "
        f"({data.shard_bytes:,} bytes each at most)",
        f"- Size: {data.total_bytes:,} bytes ({data.total_bytes:,} byte tokens) "
        f"from {data.files:,} files",
        f"- Data hash: `{data.hash()}`",
        "",
        "## Sampling",
        "",
        "```",
        f'crowdtrain sample --model {shlex.quote(str(out))} --prompt "def "',
        "```",
        "",
        "## Contributors",
        "",
        "Ranked by verified samples: the samples of a volunteer's accepted contributions that "
        "were aggregated into a version.",
        "",
        "| Rank | Volunteer | Verified samples | Accepted | Rejected | Banned |",
        "|---:|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {i} | {_md(p.name)} | {p.verified_samples:,} | {p.accepted} | {p.rejected} "
        f"| {'yes' if p.banned else 'no'} |"
        for i, p in enumerate(people, start=1)
    ]
    if not people:
        lines.append("| | (no contributions yet) | | | | |")
    lines += [
        "",
        f"Files: `{WEIGHTS}` (weights), `{CONFIG}` (architecture and run), "
        f"`{RUN_MANIFEST}` (run manifest), `{DATA_MANIFEST}` (data shards).",
        "",
    ]
    return "\n".join(lines)


# --- writing -----------------------------------------------------------------------------------


def _is_export(out: Path) -> bool:
    try:
        doc = strictjson.loads((out / CONFIG).read_bytes()[:MAX_CONFIG_BYTES])
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _prepare_out(out: Path) -> None:
    """Create `out`, or accept it when empty or a previous export (whose files are replaced)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a directory for the export")
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in out.iterdir()]
    stray = sorted(
        n for n in names if n not in FILES and not (n.startswith(".") and n.endswith(".tmp"))
    )
    if names and (stray or not _is_export(out)):
        what = f"it holds {stray[0]!r}" if stray else f"it has no crowdtrain {CONFIG}"
        raise ExportError(
            f"{out} is not empty and is not a crowdtrain model export ({what}); "
            "choose a new or empty directory"
        )


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    path.chmod(0o644)


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def export_model(state: Path, out: Path, *, version: int | None = None) -> ExportSummary:
    """Write version `version` (default: the latest) of the run in `state` to the directory
    `out`: weights, config, data and run manifests, and a model card.

    `out` is created if needed; an existing `out` must be empty or a previous export, whose five
    files are then replaced (nothing else is ever overwritten).
    """
    state, out = Path(state), Path(out)
    _check_state(state)
    blobs = DirBlobStore(state / BLOBS_DIR)
    try:
        store = SqliteStateStore(state / STATE_FILE)
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    try:
        config = _run_config(store)
        versions = store.list_versions()
        if not versions:
            raise ExportError(f"the run in {state} has no model versions yet")
        if version is None:
            row = versions[-1]
        else:
            found = [v for v in versions if v.version == version]
            if not found:
                raise ExportError(
                    f"the run has no version {version}; versions go from "
                    f"{versions[0].version} to {versions[-1].version}"
                )
            row = found[0]
        initial = versions[0]
        stored = store.get_json(MANIFEST_DOC)
        if stored is None:
            raise ExportError(
                f"the state in {state} holds no run manifest; start its coordinator once with "
                "this version of crowdtrain (crowdtrain serve --state …), then export again"
            )
        signed_doc, data = _stored_manifest(stored, config, initial)
        tensors = _weights(blobs, row, config)
        built = [v for v in versions if 0 < v.version <= row.version]
        people = _contributors(store, built)
    finally:
        store.close()

    mhash = str(signed_doc["hash"])
    signed = "signature" in signed_doc
    eval_loss = strictjson.finite_or_none(row.metrics.get("eval_loss"))
    initial_loss = strictjson.finite_or_none(initial.metrics.get("eval_loss"))
    weights = save(
        {k: v.contiguous() for k, v in tensors.items()},
        metadata={
            "format": "pt",
            "crowdtrain_version": str(row.version),
            "crowdtrain_run": config.name,
            "crowdtrain_arch": config.model.arch,
            "crowdtrain_manifest_hash": mhash,
        },
    )
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": config.model.arch,
        "model": config.model.model_dump(mode="json"),
        "params": count_params(config.model),
        "version": row.version,
        "round": row.round,
        "eval_loss": eval_loss,
        "initial_eval_loss": initial_loss,
        "run": config.name,
        "manifest_hash": mhash,
        "config_hash": config_hash(config),
        "data_hash": data.hash(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    card = _card(
        out=out,
        config=config,
        row=row,
        initial_loss=initial_loss,
        data=data,
        mhash=mhash,
        signed=signed,
        people=people,
    )
    contents = {
        WEIGHTS: weights,
        DATA_MANIFEST: data.to_bytes(),
        RUN_MANIFEST: _json_bytes(signed_doc),
        CARD: card.encode(),
        CONFIG: _json_bytes(doc),
    }
    _prepare_out(out)
    for name in FILES:
        _write(out / name, contents[name])
    return ExportSummary(
        out=out,
        version=row.version,
        round=row.round,
        eval_loss=eval_loss,
        files=FILES,
        contributors=sum(p.verified_samples > 0 for p in people),
        manifest_hash=mhash,
        signed=signed,
    )


# --- loading -----------------------------------------------------------------------------------


def load_exported(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and weights of the export in directory `path` (JSON and safetensors
    only; names and shapes checked against the architecture)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"there is no exported model at {path}; pass the directory of an export")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ExportError(f"{path} is not a crowdtrain model export: {name} is missing")
    raw = (path / CONFIG).read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise ExportError(f"{path / CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = strictjson.loads(raw)
    except ValueError as exc:
        raise ExportError(f"{path / CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{path / CONFIG} is not a crowdtrain model config (format {FORMAT!r})")
    try:
        cfg = ModelConfig.model_validate(doc.get("model"))
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(["model", *(str(p) for p in problem["loc"])])
        raise ExportError(f"{path / CONFIG} has a bad '{where}': {problem['msg']}") from None
    want = doc.get("weights_sha256")
    if want is not None and want != _file_sha256(path / WEIGHTS):
        raise ExportError(
            f"{path / WEIGHTS} is not the file {CONFIG} describes; export the model again"
        )
    try:
        tensors = load_file(path / WEIGHTS)
    except (SafetensorError, OSError):
        raise ExportError(f"{path / WEIGHTS} is not a readable safetensors file") from None
    _check_shapes(tensors, cfg, f"the weights in {path / WEIGHTS}")
    return cfg, tensors


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "ExportError",
    "ExportSummary",
    "export_model",
    "load_exported",
]
