"""Exporting a model from a real coordinator's state directory, and loading it back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from crowdtrain.client.signing import manifest_hash, signature_is_valid
from crowdtrain.config import RunConfig
from crowdtrain.data import load_manifest
from crowdtrain.export import ExportError, export_model, load_exported
from crowdtrain.models.generate import generate
from crowdtrain.server.coordinator import ContributionMeta, Coordinator, Problem, token_hash
from crowdtrain.store import DirBlobStore, SqliteStateStore

# The coordinator test helpers live beside their conftest; reuse them rather than copy them.
sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))
from server_helpers import (
    FakeClock,
    make_payload,
    server_config,
    write_corpus,
    wrong_shape_payload,
)

SAMPLES = {"alice": 8, "bob <b>|x": 24}


@dataclass(frozen=True)
class Run:
    """A closed-down coordinator's state after two rounds with two volunteers."""

    config: RunConfig
    state: Path
    data: Path
    tokens: tuple[str, ...]
    peer_ids: tuple[str, ...]
    manifest: dict[str, object]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("export-run")
    config = server_config(write_corpus(root / "corpus.py"), root / "data")
    coord = Coordinator(config, root / "state", clock=FakeClock(), eval_batch_count=1)
    joined = {name: coord.register(name, {}) for name in [*SAMPLES, "carol"]}
    ids = {name: doc["peer_id"] for name, doc in joined.items()}
    for rnd in range(2):
        for i, (name, samples) in enumerate(SAMPLES.items()):
            order = coord.work(ids[name])
            assert (order["kind"], order["round"]) == ("work", rnd)
            payload = make_payload(config, seed=10 * rnd + i)
            meta = ContributionMeta(order["base_version"], samples, 32 * samples, 2, 5.0)
            coord.submit(ids[name], rnd, meta, coord.blobs.put_bytes(payload), len(payload))
    # carol uploads a malformed payload (rejected) and is then banned by the organizer.
    bad = wrong_shape_payload(config)
    with pytest.raises(Problem):
        coord.submit(
            ids["carol"],
            1,
            ContributionMeta(1, 4, 128, 2, 5.0),
            coord.blobs.put_bytes(bad),
            len(bad),
        )
    coord.store.set_banned(ids["carol"], True, "organizer")
    assert coord.protocol.version == 2
    manifest = coord.manifest
    coord.settle()  # the versions' evaluations run after their commits, on worker threads
    coord.shutdown()
    coord.store.close()
    return Run(
        config,
        root / "state",
        root / "data",
        tuple(doc["token"] for doc in joined.values()),
        tuple(ids.values()),
        manifest,
    )


def version_weights(state: Path, version: int) -> dict[str, torch.Tensor]:
    with SqliteStateStore(state / "state.sqlite") as store:
        row = store.get_version(version)
    assert row is not None
    return dict(load_safetensors(DirBlobStore(state / "blobs").read(row.weights_sha)))


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_export_writes_a_self_contained_model(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "model"
    summary = export_model(run.state, out)
    assert (summary.version, summary.round, summary.contributors) == (2, 1, 2)
    assert summary.signed and summary.eval_loss is not None
    assert sorted(p.name for p in out.iterdir()) == sorted(summary.files)

    cfg, params = load_exported(out)
    assert cfg == run.config.model
    expected = version_weights(run.state, 2)
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[k], expected[k]) for k in expected)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["crowdtrain_version"] == "2"

    doc = json.loads((out / "config.json").read_text())
    assert doc["format"] == "crowdtrain-model" and doc["arch"] == "gpt"
    assert (doc["version"], doc["round"], doc["run"]) == (2, 1, run.config.name)
    assert doc["manifest_hash"] == summary.manifest_hash == run.manifest["hash"]

    # The manifest is the signed one the coordinator serves.
    signed = json.loads((out / "manifest.json").read_text())
    assert signed == run.manifest
    assert manifest_hash(signed["manifest"]) == signed["hash"]
    assert signature_is_valid(signed["hash"], signed["signature"], signed["public_key"])
    assert (out / "data_manifest.json").read_bytes() == load_manifest(run.data).to_bytes()

    text = generate(cfg, params, "def ", 20, seed=1)
    assert text == generate(cfg, params, "def ", 20, seed=1)


def test_model_card_ranks_volunteers_by_verified_samples_and_hides_secrets(
    run: Run, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    export_model(run.state, out)
    card = (out / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [
        r"| 1 | bob \<b\>\|x | 48 | 2 | 0 | no |",
        "| 2 | alice | 16 | 2 | 0 | no |",
        "| 3 | carol | 0 | 0 | 1 | yes |",
    ]
    assert f"`{run.manifest['hash']}`" in card
    assert f"crowdtrain sample --model {out}" in card
    assert "2 rounds trained" in card and "13 shards" not in card
    everything = "".join(p.read_text(errors="replace") for p in out.iterdir())
    for secret in [*run.tokens, *map(token_hash, run.tokens), *run.peer_ids]:
        assert secret not in everything


def test_an_earlier_version_counts_only_the_rounds_that_built_it(run: Run, tmp_path: Path) -> None:
    summary = export_model(run.state, tmp_path / "v1", version=1)
    assert (summary.version, summary.round) == (1, 0)
    _, params = load_exported(tmp_path / "v1")
    expected = version_weights(run.state, 1)
    assert all(torch.equal(params[k], expected[k]) for k in expected)
    card = (tmp_path / "v1" / "README.md").read_text()
    assert "| 2 | alice | 8 | 1 | 0 | no |" in card
    assert "carol" not in card  # her rejected upload was for round 1


def test_export_only_reads_the_state_directory(run: Run, tmp_path: Path) -> None:
    before = tree(run.state)
    export_model(run.state, tmp_path / "model")
    assert tree(run.state) == before


def test_the_output_directory_is_new_empty_or_a_previous_export(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "model"
    export_model(run.state, out, version=1)
    export_model(run.state, out)  # a previous export: its files are replaced
    assert load_exported(out)[0] == run.config.model
    assert json.loads((out / "config.json").read_text())["version"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(run.state, empty)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a crowdtrain model export"):
        export_model(run.state, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    with pytest.raises(ExportError, match="not a crowdtrain model export"):
        export_model(run.state, foreign)
    assert (foreign / "README.md").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(run.state, tmp_path / "file")


def test_the_stored_signed_manifest_needs_no_corpus(run: Run, tmp_path: Path) -> None:
    summary = export_model(run.state, tmp_path / "a")
    assert summary.signed and summary.manifest_hash == run.manifest["hash"]
    state = tmp_path / "state"
    shutil.copytree(run.state, state)
    with SqliteStateStore(state / "state.sqlite") as store:
        store.put_json("manifest", {**run.manifest, "hash": "0" * 64})
    with pytest.raises(ExportError, match="does not match its hash"):
        export_model(state, tmp_path / "b")


def test_without_a_stored_manifest_export_says_what_to_do(run: Run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(run.state, state)
    with contextlib.closing(sqlite3.connect(state / "state.sqlite")) as db, db:
        db.execute("DELETE FROM documents WHERE key = 'manifest'")
    with pytest.raises(ExportError, match="holds no run manifest; start its coordinator once"):
        export_model(state, tmp_path / "a")


def test_state_directory_problems_are_one_sentence(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no state directory"):
        export_model(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ExportError, match="not a crowdtrain state directory"):
        export_model(tmp_path / "bare", tmp_path / "out")
    assert not (tmp_path / "bare" / "state.sqlite").exists()
    junk = tmp_path / "junk"
    (junk / "blobs").mkdir(parents=True)
    (junk / "state.sqlite").write_bytes(b"not a database")
    with pytest.raises(ExportError, match="not a crowdtrain state store"):
        export_model(junk, tmp_path / "out")
    assert (junk / "state.sqlite").read_bytes() == b"not a database"

    with pytest.raises(ExportError, match="has no version 7; versions go from 0 to 2"):
        export_model(run.state, tmp_path / "out", version=7)

    fresh = tmp_path / "fresh"
    (fresh / "blobs").mkdir(parents=True)
    with SqliteStateStore(fresh / "state.sqlite") as store:
        store.put_json("config", run.config.model_dump(mode="json"))
    with pytest.raises(ExportError, match="no model versions"):
        export_model(fresh, tmp_path / "out")

    broken = tmp_path / "broken"
    shutil.copytree(run.state, broken)
    with SqliteStateStore(broken / "state.sqlite") as store:
        row = store.get_version(2)
    assert row is not None
    DirBlobStore(broken / "blobs").delete(row.weights_sha)
    with pytest.raises(ExportError, match=r"weights of version 2 .* are missing"):
        export_model(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_refuses_what_is_not_a_sound_export(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no exported model"):
        load_exported(tmp_path / "missing")
    out = tmp_path / "model"
    export_model(run.state, out)
    config = out / "config.json"
    doc = json.loads(config.read_text())

    (out / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(ExportError, match=r"model\.safetensors is missing"):
        load_exported(out)
    (tmp_path / "weights").rename(out / "model.safetensors")

    config.write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_exported(out)
    config.write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(ExportError, match="not a crowdtrain model config"):
        load_exported(out)
    config.write_text(json.dumps({**doc, "model": {**doc["model"], "arch": "rnn"}}))
    with pytest.raises(ExportError, match=r"bad 'model\.arch'"):
        load_exported(out)

    config.write_text(json.dumps(doc))
    _, params = load_exported(out)
    name = sorted(params)[0]
    save_file({**params, name: torch.zeros(3)}, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match=r"not the file config\.json describes"):
        load_exported(out)
    config.write_text(json.dumps({k: v for k, v in doc.items() if k != "weights_sha256"}))
    with pytest.raises(ExportError, match=f"tensor '{name}' has shape \\(3,\\)"):
        load_exported(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_exported(out)
