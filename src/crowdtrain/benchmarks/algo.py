"""Algorithm benchmark: one worker, synchronous data-parallel, and DiLoCo with three codecs.

Reproduces, at a scale a 2-core machine can run, the comparison of DiLoCo (Douillard et al. 2023,
"DiLoCo: Distributed Low-Communication Training of Language Models", arXiv:2311.08105, Table 2
and Fig. 2) against synchronous data-parallel training that averages gradients every step, plus
DiLoCo with int8 blockwise compression and with SparseLoCo-style top-k + 2-bit values and error
feedback (Sarfi et al. 2025, arXiv:2508.15706).

**Fairness.** Every method sees the same corpus with the same access (every worker samples
windows uniformly from all training shards: DiLoCo's peers are given every shard, as each
data-parallel rank is), the same initial weights, the same evaluation batches, the same number
of inner steps per worker and the same learning-rate schedule. Every method gets the same sweep
of the inner (peak) learning rate on the first seed and is scored at its own best; the other
seeds then repeat each method at its chosen rate, and the report gives the mean and the spread.
Choosing on the first seed favours every method alike; the later seeds are unbiased. DiLoCo's
outer learning rate and momentum are the ones the run derives (`config.outer_rule`), as a run
that leaves them out of its config gets them.

Bytes are those each worker *sends*: for data-parallel a ring all-reduce of fp32 gradients every
step, 2·(N−1)/N · 4P bytes (the bandwidth-optimal all-reduce, Patarasuk & Yuan 2009); for DiLoCo
the real encoded payload of each round's pseudo-gradient, as the networked system uploads it.

**Frontier.** `run_frontier` trains DiLoCo at every H of `FRONTIER_H` with every codec of
`FRONTIER_CODECS` at one inner learning rate and plots eval loss against bytes per worker, with
data-parallel training and one worker as reference points: the trade-off the scaling-law study
of DiLoCo maps at large scale (Charles et al. 2025, arXiv:2503.09799).

Runs are separate processes (``python -m crowdtrain.benchmarks.algo SPEC``, one torch thread
each, `jobs` at a time) that hand back one JSON line, so nothing crosses a process boundary but
JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdtrain.config import ConfigError, RunConfig, parse_config
from crowdtrain.data import DataManifest, ensure_packed_for, eval_batches
from crowdtrain.models import count_params, initial_state
from crowdtrain.sim.ddp import global_batches
from crowdtrain.sim.report import PlotUnavailable
from crowdtrain.sim.swarm import load_shards, run_swarm
from crowdtrain.train import LocalTrainer, evaluate

ALL_SHARDS = 100_000  # data.shards_per_peer's ceiling: every peer samples from every shard


@dataclass(frozen=True)
class AlgoSetting:
    """The size of one benchmark run, and the inner learning rates and seeds it sweeps."""

    workers: int
    inner_steps: int
    total_steps: int
    width: int
    depth: int
    context: int
    batch_size: int
    eval_batches: int
    lrs: tuple[float, ...]  # the inner (peak) learning rates every method is tried at
    seeds: tuple[int, ...]  # the first chooses each method's rate; all are reported
    source: str = "stdlib"  # the corpus (data.source) and where it is packed (data.dir)
    data_dir: str = "data/stdlib"
    shard_bytes: int = 1 << 20
    val_fraction: float = 0.02


# H = 10: the quick setting's point of the algorithm issue's goal (DiLoCo within 3% of DDP with
# at least 50× fewer bytes per worker: 55× with int8). `--inner-steps 25` is the 138× point.
QUICK = AlgoSetting(
    workers=4,
    inner_steps=10,
    total_steps=300,
    width=96,
    depth=3,
    context=64,
    batch_size=16,
    eval_batches=16,
    lrs=(1.5e-3, 3e-3, 6e-3),
    seeds=(0, 1),
)
FULL = AlgoSetting(
    workers=4,
    inner_steps=50,
    total_steps=1500,
    width=128,
    depth=4,
    context=128,
    batch_size=16,
    eval_batches=32,
    lrs=(1e-3, 2e-3, 4e-3, 8e-3),
    seeds=(0, 1, 2),
)
FRONTIER_H = (5, 10, 25, 50, 100)


def setting(quick: bool, inner_steps: int | None = None) -> AlgoSetting:
    """The quick or full setting, with DiLoCo's H replaced when `inner_steps` is given; the
    total steps stay the same, so H must divide them."""
    s = QUICK if quick else FULL
    if inner_steps is None:
        return s
    if s.total_steps % inner_steps:
        raise ConfigError(
            f"H = {inner_steps} does not divide the setting's {s.total_steps} steps per worker"
        )
    return dataclasses.replace(s, inner_steps=inner_steps)


FRONTIER_CODECS = ("fp32", "int8", "int4", "topk2bit")


@dataclass(frozen=True)
class Method:
    """One training method of the benchmark."""

    name: str
    kind: str  # "single" (one worker), "ddp" (every-step all-reduce) or "diloco"
    codec: str = "fp32"
    state: str = "derived"  # inner.optimizer_state of a DiLoCo method

    @property
    def outer(self) -> str:
        """SparseLoCo pairs the top-k codec with error feedback and a plain SGD outer step."""
        return "error_feedback" if self.codec == "topk2bit" else "nesterov"


METHODS = (
    Method("single", "single"),
    Method("ddp", "ddp"),
    Method("diloco", "diloco"),
    Method("diloco_int8", "diloco", "int8"),
    Method("diloco_topk", "diloco", "topk2bit"),
)
STATE_METHODS = (
    Method("diloco_int8_published_state", "diloco", "int8", "published"),
    Method("diloco_int8_kept_state", "diloco", "int8", "kept"),
    Method("diloco_int8_fresh_state", "diloco", "int8", "fresh"),
)


def bench_config(
    s: AlgoSetting,
    codec: str = "fp32",
    outer: str = "nesterov",
    state: str = "derived",
    *,
    lr: float | None = None,
    seed: int = 0,
) -> RunConfig:
    """The run config of one DiLoCo method at setting `s` (plain mean: no attackers here).

    `state` is ``inner.optimizer_state``: crowdtrain's default ``"derived"`` (replayable),
    ``"published"`` (replayable, the coordinator's second moments), DiLoCo's own ``"kept"``,
    or ``"fresh"``. The outer lr and momentum are the ones the run
    derives (``config.outer_rule``); the top-k codec is paired with SparseLoCo's outer step
    (plain SGD, lr 1, error feedback with decay 0.95 on the workers), as in that paper. `lr`
    (the inner peak learning rate) defaults to the config's; `seed` sets the initial weights,
    the data order and the evaluation batches.
    """
    sparse = outer == "error_feedback"
    return parse_config(
        {
            "name": "bench-algo",
            "seed": seed,
            "model": {
                "arch": "gpt",
                "width": s.width,
                "depth": s.depth,
                "heads": 4,
                "context": s.context,
                "init_seed": seed,
            },
            "data": {
                "source": s.source,
                "dir": s.data_dir,
                "shard_bytes": s.shard_bytes,
                "val_fraction": s.val_fraction,
                "batch_size": s.batch_size,
                "seed": seed,
                "shards_per_peer": ALL_SHARDS,
            },
            "inner": {
                "steps": s.inner_steps,
                "total_steps": s.total_steps,
                "warmup_steps": max(1, s.total_steps // 20),
                "optimizer_state": state,
                "threads": 1,
                **({} if lr is None else {"lr": lr}),
            },
            "outer": {"optimizer": outer, **({"lr": 1.0} if sparse else {})},
            "codec": {"name": codec, "ef_decay": 0.95 if sparse else 1.0},
            "aggregation": {"method": "mean", "bucket_size": 1},
            "rounds": {"total": s.total_steps // s.inner_steps, "quorum": s.workers},
            "defence": {"enabled": False},
        }
    )


def _sequential(
    config: RunConfig,
    shards: Mapping[str, np.ndarray],
    train_ids: Sequence[str],
    workers: int,
    evals: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Train one AdamW run for total_steps on `workers` workers' batches per step; eval loss."""
    # One global batch of data-parallel training: the N workers' batches side by side.
    batches = global_batches(config, workers, shards, train_ids, rank_prefix="peer-")
    trainer = LocalTrainer(config.model, config.inner)
    trainer.train(initial_state(config.model), batches, max_steps=config.inner.total_steps)
    return evaluate(config.model, trainer.current_state(), evals)


def bench_data(
    config: RunConfig, s: AlgoSetting
) -> tuple[DataManifest, dict[str, np.ndarray], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The corpus (packed if needed), its shards and the evaluation batches every method of
    setting `s` is scored on (they depend on ``config.data.seed``)."""
    manifest = ensure_packed_for(config.data)
    shards = load_shards(manifest, Path(config.data.dir))
    evals = eval_batches(
        shards,
        manifest.val_ids,
        batch_size=32,
        context=s.context,
        n_batches=s.eval_batches,
        seed=config.data.seed,
    )
    return manifest, shards, evals


def ring_bytes(s: AlgoSetting, params: int) -> float:
    """What one data-parallel worker sends over the run: a ring all-reduce of fp32 gradients
    every step."""
    return 2 * (s.workers - 1) / s.workers * 4 * params * s.total_steps


def run_one(s: AlgoSetting, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """Train `method` at setting `s`, inner learning rate `lr` and `seed`, in this process.

    Returns the final eval loss (NaN when the run diverged), the bytes one worker sent and the
    wall seconds."""
    started = time.monotonic()
    cfg = bench_config(s, method.codec, method.outer, method.state, lr=lr, seed=seed)
    torch.set_num_threads(cfg.inner.threads)
    if method.kind == "diloco":
        res = run_swarm(
            cfg,
            s.workers,
            eval_batch_count=s.eval_batches,
            eval_batch_size=32,
            eval_every=cfg.rounds.total,
        )
        loss, sent = res.final_eval_loss, sum(r.bytes_up for r in res.rounds) / s.workers
    else:
        manifest, shards, evals = bench_data(cfg, s)
        workers = 1 if method.kind == "single" else s.workers
        loss = _sequential(cfg, shards, manifest.train_ids, workers, evals)
        sent = ring_bytes(s, count_params(cfg.model)) if method.kind == "ddp" else 0.0
    return {
        "eval_loss": loss if math.isfinite(loss) else math.nan,
        "bytes_per_worker": int(sent),
        "seconds": round(time.monotonic() - started, 1),
    }


def _spec(s: AlgoSetting, method: Method, lr: float, seed: int) -> str:
    return json.dumps(
        {
            "setting": dataclasses.asdict(s),
            "method": dataclasses.asdict(method),
            "lr": lr,
            "seed": seed,
        }
    )


def _from_spec(text: str) -> tuple[AlgoSetting, Method, float, int]:
    doc = json.loads(text)
    raw = dict(doc["setting"])
    raw["lrs"], raw["seeds"] = tuple(raw["lrs"]), tuple(raw["seeds"])
    return AlgoSetting(**raw), Method(**doc["method"]), float(doc["lr"]), int(doc["seed"])


def _run_process(s: AlgoSetting, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """`run_one` in a child process (one torch thread), its answer read back as JSON.

    A run that fails (a diverged swarm whose payloads the codec refuses, say) counts as
    diverged, with the last line of its error in ``"error"``, so one bad rate does not end
    the sweep."""
    proc = subprocess.run(
        [sys.executable, "-m", "crowdtrain.benchmarks.algo", _spec(s, method, lr, seed)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"eval_loss": math.nan, "bytes_per_worker": 0, "seconds": 0.0, "error": tail[0]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


Job = tuple[Method, float, int]


def _failure(result: Mapping[str, Any]) -> str:
    """The log's note of a failed run: its error's last line."""
    return f" failed: {result['error']}" if "error" in result else ""


def _run_all(
    s: AlgoSetting, todo: Sequence[Job], jobs: int, log: Callable[[str], None]
) -> dict[Job, dict[str, Any]]:
    def go(job: Job) -> tuple[Job, dict[str, Any]]:
        method, lr, seed = job
        result = _run_process(s, method, lr, seed)
        log(
            f"{method.name:24s} lr {lr:g} seed {seed}: eval loss {result['eval_loss']:.4f} "
            f"({result['seconds']} s){_failure(result)}"
        )
        return job, result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(go, todo))


def best_lr(sweep: Mapping[float, float]) -> float | None:
    """The learning rate of the lowest finite loss (the smaller rate on a tie); None when
    every run diverged."""
    finite = [(loss, lr) for lr, loss in sweep.items() if math.isfinite(loss)]
    return min(finite)[1] if finite else None


def _json_loss(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _pack(s: AlgoSetting) -> None:
    """Pack the corpus once, before parallel runs race to do it."""
    ensure_packed_for(bench_config(s).data)


def run_algo_bench(
    quick: bool = False,
    *,
    setting: AlgoSetting | None = None,
    methods: Sequence[Method] | None = None,
    jobs: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sweep every method's inner learning rate, repeat each at its best on every seed, and
    return the benchmark's JSON document (`setting` and `methods` override the preset's)."""
    s = setting or (QUICK if quick else FULL)
    chosen = list(methods or (METHODS if quick else METHODS + STATE_METHODS))
    if "ddp" not in {m.name for m in chosen}:
        raise ValueError("the benchmark's ratios need the ddp method")
    _pack(s)
    first, rest = s.seeds[0], s.seeds[1:]
    sweep = _run_all(s, [(m, lr, first) for m in chosen for lr in s.lrs], jobs, log)
    best: dict[str, float | None] = {
        m.name: best_lr({lr: sweep[(m, lr, first)]["eval_loss"] for lr in s.lrs}) for m in chosen
    }
    again = [(m, b, seed) for m in chosen if (b := best[m.name]) is not None for seed in rest]
    runs = {**sweep, **_run_all(s, again, jobs, log)}
    rows: dict[str, dict[str, Any]] = {}
    for m in chosen:
        b = best[m.name]
        by_seed = {seed: runs[(m, b, seed)]["eval_loss"] for seed in s.seeds} if b else {}
        losses = list(by_seed.values())
        rows[m.name] = {
            "kind": m.kind,
            "codec": m.codec,
            "optimizer_state": m.state if m.kind == "diloco" else None,
            "lr_sweep": {f"{lr:g}": _json_loss(sweep[(m, lr, first)]["eval_loss"]) for lr in s.lrs},
            "best_lr": b,
            "eval_loss_by_seed": {str(k): _json_loss(v) for k, v in by_seed.items()},
            "eval_loss": _json_loss(statistics.fmean(losses)) if losses else None,
            "eval_loss_spread": _json_loss(max(losses) - min(losses)) if losses else None,
            "bytes_per_worker": sweep[(m, b or s.lrs[0], first)]["bytes_per_worker"],
            "steps": s.total_steps,
            "seconds": round(sum(r["seconds"] for (mm, _, _), r in runs.items() if mm == m), 1),
            "errors": {
                f"lr {lr:g} seed {seed}": r["error"]
                for (mm, lr, seed), r in runs.items()
                if mm == m and "error" in r
            },
        }
    ddp = rows["ddp"]
    for row in rows.values():
        row["vs_ddp"] = _ratios(row["eval_loss_by_seed"], ddp["eval_loss_by_seed"])
        sent = row["bytes_per_worker"]
        row["fewer_bytes_than_ddp"] = round(ddp["bytes_per_worker"] / sent, 1) if sent else None
    if "diloco" in rows and "diloco_int8" in rows:
        rows["diloco_int8"]["vs_fp32"] = _ratios(
            rows["diloco_int8"]["eval_loss_by_seed"], rows["diloco"]["eval_loss_by_seed"]
        )
    cfg = bench_config(s)
    return {
        "methods": rows,
        "config": {
            "quick": quick,
            "workers": s.workers,
            "inner_steps_H": s.inner_steps,
            "steps_per_worker": s.total_steps,
            "rounds": s.total_steps // s.inner_steps,
            "params": count_params(cfg.model),
            "model": cfg.model.model_dump(mode="json"),
            "batch_size_per_worker": s.batch_size,
            "inner": cfg.inner.model_dump(mode="json"),
            "outer": cfg.outer.model_dump(mode="json"),
            "lr_sweep": list(s.lrs),
            "seeds": list(s.seeds),
            "eval_batches": s.eval_batches,
            "corpus": cfg.data.source,
            "shards_per_peer": "all",
            "torch_threads_per_run": cfg.inner.threads,
            "jobs": jobs,
        },
    }


def _ratios(losses: Mapping[str, float | None], ref: Mapping[str, float | None]) -> Any:
    """Mean, lowest and highest ratio of `losses` to `ref` over the seeds both have finite."""
    pairs = [(v, ref[k]) for k, v in losses.items() if v is not None and ref.get(k) is not None]
    ratios = [v / r for v, r in pairs if r]
    if not ratios:
        return None
    return {
        "mean": round(statistics.fmean(ratios), 4),
        "low": round(min(ratios), 4),
        "high": round(max(ratios), 4),
    }


def run_frontier(
    quick: bool = False,
    *,
    setting: AlgoSetting | None = None,
    hs: Sequence[int] = FRONTIER_H,
    codecs: Sequence[str] = FRONTIER_CODECS,
    lr: float | None = None,
    jobs: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """DiLoCo's eval loss against the bytes each worker sends, for every H × codec, with
    data-parallel training and one worker at the same inner learning rate (default: the
    config's) and seed (the setting's first) as reference points."""
    base = setting or (QUICK if quick else FULL)
    rate = lr if lr is not None else bench_config(base).inner.lr
    seed = base.seeds[0]
    _pack(base)
    todo: list[tuple[AlgoSetting, Method]] = [(base, Method("ddp", "ddp"))]
    todo.append((base, Method("single", "single")))
    for h in hs:
        if not 0 < h <= base.total_steps:
            raise ValueError(f"H must be between 1 and the run's {base.total_steps} steps, not {h}")
        s = dataclasses.replace(base, inner_steps=h)
        todo += [(s, Method(f"diloco_{c}_H{h}", "diloco", c)) for c in codecs]

    def go(job: tuple[AlgoSetting, Method]) -> dict[str, Any]:
        s, method = job
        result = _run_process(s, method, rate, seed)
        log(
            f"{method.name:24s} eval loss {result['eval_loss']:.4f}  bytes sent per worker "
            f"{result['bytes_per_worker']:,} ({result['seconds']} s){_failure(result)}"
        )
        return {
            "method": method.kind,
            "codec": method.codec if method.kind == "diloco" else None,
            "H": s.inner_steps if method.kind == "diloco" else None,
            "rounds": s.total_steps // s.inner_steps if method.kind == "diloco" else None,
            "eval_loss": _json_loss(result["eval_loss"]),
            "bytes_per_worker": result["bytes_per_worker"],
            "seconds": result["seconds"],
            "error": result.get("error"),
        }

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        points = list(pool.map(go, todo))
    ddp, single = points[0], points[1]
    for ref in (ddp, single):
        if ref["eval_loss"] is None:
            raise RuntimeError(f"the frontier's {ref['method']} reference failed: {ref['error']}")
    for p in points:
        loss, ref = p["eval_loss"], ddp["eval_loss"]
        p["vs_ddp"] = round(loss / ref, 4) if loss is not None and ref else None
    cfg = bench_config(base, lr=rate, seed=seed)
    return {
        "ddp": ddp,
        "single": single,
        "points": points[2:],
        "config": {
            "quick": quick,
            "workers": base.workers,
            "steps_per_worker": base.total_steps,
            "params": count_params(cfg.model),
            "model": cfg.model.model_dump(mode="json"),
            "inner_lr": rate,
            "seed": seed,
            "optimizer_state": cfg.inner.optimizer_state,
            "outer": "derived per run (config.outer_rule); top-k: SGD lr 1 with error feedback",
        },
    }


def frontier_table(doc: Mapping[str, Any]) -> str:
    """The frontier as a markdown table: one row per H, one column per codec."""
    points = doc["points"]
    codecs = list(dict.fromkeys(p["codec"] for p in points))
    hs = sorted({p["H"] for p in points})
    at = {(p["codec"], p["H"]): p for p in points}
    lines = ["| H | rounds | " + " | ".join(codecs) + " |", "|---|---|" + "---|" * len(codecs)]
    for h in hs:
        cells = []
        for c in codecs:
            p = at.get((c, h))
            if p is None:
                cells.append("")
                continue
            loss = "diverged" if p["eval_loss"] is None else f"{p['eval_loss']:.4f}"
            cells.append(f"{loss} ({_mb(p['bytes_per_worker'])})")
        rounds = next(p["rounds"] for p in points if p["H"] == h)
        lines.append(f"| {h} | {rounds} | " + " | ".join(cells) + " |")
    ddp, single = doc["ddp"], doc["single"]
    lines.append("")
    lines.append(
        f"Data-parallel: {ddp['eval_loss']:.4f} ({_mb(ddp['bytes_per_worker'])}); "
        f"one worker: {single['eval_loss']:.4f}. Cells: eval loss (bytes sent per worker)."
    )
    return "\n".join(lines) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def plot_frontier(doc: Mapping[str, Any], path: Path) -> Path:
    """Eval loss against bytes per worker (log scale): a line per codec through its H values,
    data-parallel training as a point at its bytes and a line, one worker as a line. The loss
    axis ends a little above one worker's loss; points beyond it are listed on the plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'crowdtrain[plot]'") from None

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ddp, single = doc["ddp"], doc["single"]
    top = single["eval_loss"] + 0.25 * (single["eval_loss"] - ddp["eval_loss"])
    points = [p for p in doc["points"] if p["eval_loss"] is not None]
    for codec in dict.fromkeys(p["codec"] for p in points):
        line = sorted((p for p in points if p["codec"] == codec), key=lambda p: p["H"])
        xs = [p["bytes_per_worker"] for p in line]
        ax.plot(xs, [p["eval_loss"] for p in line], marker="o", label=f"DiLoCo {codec}")
        for p in line:
            if p["eval_loss"] <= top:
                ax.annotate(
                    f"{p['H']}",
                    (p["bytes_per_worker"], p["eval_loss"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(2, 3),
                )
    ax.plot(
        [ddp["bytes_per_worker"]],
        [ddp["eval_loss"]],
        marker="s",
        color="black",
        linestyle="",
        label="data-parallel (every step)",
    )
    ax.axhline(ddp["eval_loss"], color="black", linestyle="--", linewidth=1)
    ax.axhline(single["eval_loss"], color="grey", linestyle=":", linewidth=1, label="one worker")
    off = [p for p in doc["points"] if p["eval_loss"] is None or p["eval_loss"] > top]
    if off:
        text = "off the scale: " + ", ".join(
            f"{p['codec']} H={p['H']} "
            + ("diverged" if p["eval_loss"] is None else f"{p['eval_loss']:.2f}")
            for p in off
        )
        ax.text(0.01, 0.99, text, transform=ax.transAxes, fontsize=7, va="top")
    low = min([ddp["eval_loss"], *(p["eval_loss"] for p in points)])
    ax.set_ylim(low - 0.05 * (top - low), top)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker over the run (log scale); labels: H")
    ax.set_ylabel("eval loss")
    cfg = doc["config"]
    ax.set_title(
        f"DiLoCo frontier: {cfg['workers']} workers, {cfg['steps_per_worker']} steps, "
        f"{cfg['params']:,} parameters"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":  # one run, for _run_process: a JSON spec in, one JSON line out
    print(json.dumps(run_one(*_from_spec(sys.argv[1]))))
