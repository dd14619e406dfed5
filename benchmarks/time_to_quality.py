"""Time to quality: wall-clock until validation retrieval reaches a target, ours (defaults) vs open_clip.

Ours runs ``finderpartner train --config configs/clip_tiny.yaml`` unchanged except for the data and output
folders; its own per-epoch validation (finderpartner.evaluate -> metrics.retrieval_metrics) is read from
metrics.jsonl. open_clip trains the same architecture (same tokenizer, same batch, epochs, warm-up, weight
decay, betas, clipping, augmentation as close as it allows) at each of ``--lrs``; every epoch checkpoint is
scored by the same evaluator: the val images through our EvalTransform and normalisation, captions through
open_clip's tokenizer (ours), embeddings into ``finderpartner.metrics.retrieval_metrics``. While a checkpoint
is being scored the open_clip process tree is suspended (SIGSTOP) and the pause is not counted.

Clocks start when the trainer process is launched (imports, data checks, model building all count) and stop
when the first epoch whose validation reaches the target has ended. Ours' time includes its own per-epoch
validation and checkpoint writes; open_clip's includes its checkpoint writes but not our scoring of them.
Runs stop at the target unless ``--full``.

    python benchmarks/time_to_quality.py                         # target text_to_image_caption_aware R@5 >= 0.9
    python benchmarks/time_to_quality.py --full                  # whole schedules, per-epoch curves
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULT_METRIC = "text_to_image_caption_aware/R@5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, help="sample-data folder (default: the project's default sample data, generated once)"
    )
    p.add_argument(
        "--metric", default=DEFAULT_METRIC, help="'<direction>/<metric>' of metrics.retrieval_metrics, or mean_recall"
    )
    p.add_argument("--target", type=float, default=0.9, help="value of --metric to reach (see README: why this one)")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="open_clip learning rates to try (default: 5e-4 1e-3 2e-3 where bf16 is native; in fp32, "
        "3-4x slower, only 5e-4, the best of the three on the bf16 machine, so that the default run "
        "stays within minutes)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of each (ours, each open_clip lr), alternated")
    p.add_argument("--full", action="store_true", help="train whole schedules instead of stopping at the target")
    p.add_argument("--only", choices=["both", "ours", "open_clip"], default="both")
    p.add_argument(
        "--ours-patch",
        action="append",
        default=[],
        metavar="PATCHES",
        help="also run ours with these benchmarks/patches.py patches (comma-separated; repeatable)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results (default benchmarks/results/time_to_quality.json)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    return p.parse_args(argv)


def ours_defaults() -> dict[str, Any]:
    """configs/clip_tiny.yaml as loaded: the schedule open_clip is given too."""
    from finderpartner.config import load_config

    cfg = load_config(common.TINY_CONFIG)
    t, a = cfg.train, cfg.data.augment
    workers = cfg.data.num_workers if cfg.data.num_workers != "auto" else None
    return {
        "batch": t.batch_size,
        "epochs": t.epochs,
        "lr": t.lr,
        "warmup": t.warmup_steps,
        "workers": workers or 2,
        "weight_decay": t.weight_decay,
        "betas": list(t.betas),
        "eps": t.eps,
        "grad_clip": t.grad_clip,
        "crop_scale": list(a.crop_scale),
        "hflip": a.hflip,
        "color_jitter": a.color_jitter,
    }


# ---------------------------------------------------------------------------------------------------------------
# Ours


def run_ours(
    data: Path, tmp: Path, tag: str, metric: str, target: float, full: bool, patches: str = ""
) -> dict[str, Any]:
    cmd = common.ours_command(
        {"output_dir": tmp, "experiment": tag, "data.root": data.resolve()}, [p for p in patches.split(",") if p]
    )
    metrics = tmp / tag / "metrics.jsonl"
    env = common.child_env({"FINDERPARTNER_CACHE": str(tmp / f"{tag}_cache")})  # a fresh micro-batch probe
    start = time.time()

    def reached(_: Any) -> bool:
        return not full and any(e["value"] >= target for e in _ours_epochs(metrics, metric, start))

    result = common.run_monitored(cmd, tmp / f"{tag}.log", env=env, on_poll=reached)
    if result.returncode != 0:
        raise SystemExit(f"our trainer failed ({result.returncode}):\n{common.tail(result.log)}")
    epochs = _ours_epochs(metrics, metric, start)
    return _outcome(epochs, target, result, metric)


def _ours_epochs(metrics: Path, metric: str, start: float) -> list[dict[str, Any]]:
    """Per-epoch validation of our run: value of ``metric`` and seconds since launch."""
    if not metrics.exists():
        return []
    key = "val/mean_recall" if metric == "mean_recall" else f"val/retrieval/{metric}"
    out = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if key in rec:
            out.append(
                {
                    "epoch": len(out) + 1,
                    "step": rec["step"],
                    "seconds": rec["time"] - start,
                    "value": rec[key],
                    "mean_recall": rec.get("val/mean_recall"),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------------------------
# open_clip


class OpenClipScorer:
    """Scores open_clip epoch checkpoints on the val split with our evaluator."""

    def __init__(self, data: Path, spec: Any, model_dir: Path):
        import open_clip

        from finderpartner.data.dataset import read_split
        from finderpartner.model import ImageSpec

        self.table, _ = read_split(data, "val")
        self.spec = ImageSpec(spec.image_size, spec.image_size, common.OPENAI_MEAN, common.OPENAI_STD)
        self.model_dir = model_dir
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
        _, self.model = common.build_both(spec, _hf_tokenizer(model_dir), model_dir)

    def score(self, checkpoint: Path) -> dict[str, dict[str, float]]:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.model.eval()
        image_emb, text_emb = self._embed()
        from finderpartner.metrics import retrieval_metrics

        _, row_to_image = self.table.images()
        return retrieval_metrics(image_emb, text_emb, row_to_image, list(self.table.captions))

    def _embed(self) -> tuple[Any, Any]:
        import torch

        from finderpartner.data.transforms import normalize
        from finderpartner.embedding import embed_image_files

        def encode(pixels: torch.Tensor) -> Any:
            return self.model.encode_image(normalize(pixels, self.spec), normalize=True).float().numpy()

        names, _ = self.table.images()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            images, failures = embed_image_files(
                [self.table.image_dir / n for n in names],
                self.spec,
                encode,
                self.model.text_projection.shape[1],
                batch_size=256,
            )
            if failures:
                raise RuntimeError(f"val images could not be read: {failures[:3]}")
            ids = self.tokenizer(list(self.table.captions))
            texts = torch.cat([self.model.encode_text(c, normalize=True).float() for c in ids.split(256)])
        return torch.from_numpy(images), texts


def _hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def run_open_clip(
    prep: dict[str, Any],
    tmp: Path,
    tag: str,
    lr: float,
    metric: str,
    target: float,
    full: bool,
    give_up_after: float | None = None,
) -> dict[str, Any]:
    """One open_clip run at ``lr``; without ``full`` it stops at the target, or once its clock passes
    ``give_up_after`` (the best open_clip time so far: a slower run cannot become the best of the three)."""
    d = prep["defaults"]
    logs = tmp / "open_clip_logs"
    cmd = common.open_clip_command(
        prep["model_dir"],
        prep["csv"],
        logs,
        tag,
        batch=d["batch"],
        workers=d["workers"],
        epochs=d["epochs"],
        lr=lr,
        warmup=d["warmup"],
        precision=prep["precision"],
        log_every=20,
        save_frequency=1,
    )
    ckpt_dir = logs / tag / "checkpoints"
    state: dict[str, Any] = {"epochs": [], "paused": 0.0, "start": time.time()}

    def poll(proc: Any) -> bool:
        k = len(state["epochs"]) + 1
        path = ckpt_dir / f"epoch_{k}.pt"
        if not path.exists():
            clock = time.time() - state["start"] - state["paused"]
            state["gave_up"] = not full and give_up_after is not None and clock > give_up_after
            return state["gave_up"]
        _score_paused(proc, path, k, state, prep["scorer"], metric)
        return not full and state["epochs"][-1]["value"] >= target

    result = common.run_monitored(cmd, tmp / f"{tag}.log", on_poll=poll)
    # The last checkpoint may appear between the last poll and the process exit.
    while (
        not full
        and (ckpt_dir / f"epoch_{len(state['epochs']) + 1}.pt").exists()
        and not any(e["value"] >= target for e in state["epochs"])
    ):
        k = len(state["epochs"]) + 1
        _score_paused(None, ckpt_dir / f"epoch_{k}.pt", k, state, prep["scorer"], metric)
    if full:
        for k in range(len(state["epochs"]) + 1, d["epochs"] + 1):
            if (ckpt_dir / f"epoch_{k}.pt").exists():
                _score_paused(None, ckpt_dir / f"epoch_{k}.pt", k, state, prep["scorer"], metric)
    if result.returncode != 0 and not state["epochs"]:
        raise SystemExit(f"open_clip failed ({result.returncode}):\n{common.tail(result.log)}")
    return {
        **_outcome(state["epochs"], target, result, metric),
        "lr": lr,
        "paused_s": state["paused"],
        "gave_up_after_s": give_up_after if state.get("gave_up") else None,
    }


def _score_paused(
    proc: Any, path: Path, epoch: int, state: dict[str, Any], scorer: OpenClipScorer, metric: str
) -> None:
    """Suspend the trainer's process tree, score the checkpoint, resume; the pause is subtracted from its clock."""
    import psutil

    procs = []
    if proc is not None and proc.poll() is None:
        try:
            root = psutil.Process(proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
    t0 = time.time()
    for p in procs:
        _quietly(p.suspend)
    try:
        ended = path.stat().st_mtime - state["start"] - state["paused"]
        metrics = _load_and_score(scorer, path, proc, procs)
    finally:
        for p in procs:
            _quietly(p.resume)
    state["paused"] += time.time() - t0 if procs else 0.0
    from finderpartner.metrics import mean_recall

    value = _select(metrics, metric)
    state["epochs"].append(
        {"epoch": epoch, "seconds": ended, "value": value, "mean_recall": mean_recall(metrics), "metrics": metrics}
    )
    print(f"    open_clip epoch {epoch}: {metric} {value:.3f} at {ended:.0f}s", flush=True)


def _load_and_score(scorer: OpenClipScorer, path: Path, proc: Any, procs: list[Any]) -> dict[str, dict[str, float]]:
    """The checkpoint may still be being written (open_clip saves in place): let the writer finish and retry."""
    for _ in range(120):
        try:
            return scorer.score(path)
        except (EOFError, RuntimeError, OSError):
            for p in procs:
                _quietly(p.resume)
            time.sleep(0.25)
            for p in procs:
                _quietly(p.suspend)
    raise SystemExit(f"could not read {path}")


def _quietly(fn: Any) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):  # the process may have exited meanwhile
        fn()


def _select(metrics: dict[str, dict[str, float]], metric: str) -> float:
    if metric == "mean_recall":
        from finderpartner.metrics import mean_recall

        return mean_recall(metrics)
    direction, _, name = metric.partition("/")
    return float(metrics[direction][name])


def _outcome(epochs: list[dict[str, Any]], target: float, result: common.RunResult, metric: str) -> dict[str, Any]:
    hit = next((e for e in epochs if e["value"] >= target), None)
    return {
        "reached": hit is not None,
        "seconds_to_target": hit["seconds"] if hit else None,
        "epoch_reached": hit["epoch"] if hit else None,
        "best": max((e["value"] for e in epochs), default=None),
        "epochs": [{k: v for k, v in e.items() if k != "metrics"} for e in epochs],
        "wall_s": result.seconds,
        "peak_pss_gib": common.gib(result.peak_pss_bytes),
        "metric": metric,
    }


# ---------------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch

    from finderpartner.config import TinySpec
    from finderpartner.env import cpu_supports_bf16

    data = common.sample_data(args.data, image_size=96, train_images=4000, val_images=300)  # make sample-data defaults
    spec = common.tiny_spec(TinySpec().image_size)
    tokenizer = common.caption_tokenizer(data, tmp / "tokenizer")
    model_dir = common.open_clip_model_dir(spec, tokenizer, tmp / "open_clip_model")
    bf16 = cpu_supports_bf16() or torch.cuda.is_available()
    return {
        "data": data,
        "spec": spec,
        "model_dir": model_dir,
        "defaults": ours_defaults(),
        "csv": common.write_open_clip_csv(data, "train", tmp / "train.tsv"),
        "precision": "amp_bf16" if bf16 else "fp32",
        "scorer": OpenClipScorer(data, spec, model_dir),
    }


def alternate(args: argparse.Namespace, prep: dict[str, Any], tmp: Path) -> dict[str, list[dict[str, Any]]]:
    jobs: list[tuple[str, Any]] = []
    if args.only in ("both", "ours"):
        jobs.append(("ours", lambda tag: run_ours(prep["data"], tmp, tag, args.metric, args.target, args.full)))
        for patches in args.ours_patch:
            jobs.append(
                (
                    f"ours+{patches}",
                    lambda tag, p=patches: run_ours(prep["data"], tmp, tag, args.metric, args.target, args.full, p),
                )
            )
    best: dict[int, float] = {}  # repeat -> best open_clip seconds so far
    if args.only in ("both", "open_clip"):
        for lr in args.lrs:
            jobs.append(
                (
                    f"open_clip lr={lr:g}",
                    lambda tag, rep, lr=lr: run_open_clip(
                        prep, tmp, tag, lr, args.metric, args.target, args.full, best.get(rep)
                    ),
                )
            )
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for name, job in jobs if rep % 2 == 0 else jobs[::-1]:
            tag = f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}_{rep}"
            print(f"  {name} (repeat {rep + 1}/{args.repeats}) ...", flush=True)
            res = job(tag, rep) if name.startswith("open_clip") else job(tag)
            runs.setdefault(name, []).append(res)
            if name.startswith("open_clip") and res["reached"]:
                best[rep] = min(best.get(rep, math.inf), res["seconds_to_target"])
            got = f"{res['seconds_to_target']:.0f}s (epoch {res['epoch_reached']})" if res["reached"] else "not reached"
            if res.get("gave_up_after_s"):
                got += f" (stopped at {res['gave_up_after_s']:.0f}s: slower than the best open_clip lr so far)"
            print(f"  {name}: {got}; best {res['best']}", flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = {}
    for name, results in runs.items():
        times = [r["seconds_to_target"] for r in results if r["reached"]]
        rows[name] = {
            "seconds_to_target": common.spread(times),
            "reached": f"{len(times)}/{len(results)}",
            "epoch_reached": common.median(r["epoch_reached"] for r in results if r["reached"]),
        }
    oc = {n: r for n, r in rows.items() if n.startswith("open_clip") and r["seconds_to_target"]["n"]}
    out: dict[str, Any] = {"rows": rows}
    if oc:
        best = min(oc, key=lambda n: oc[n]["seconds_to_target"]["median"])
        out["best_open_clip"] = best
        for name, r in rows.items():
            if name.startswith("ours") and r["seconds_to_target"]["n"]:
                ratio = r["seconds_to_target"]["median"] / oc[best]["seconds_to_target"]["median"]
                out.setdefault("ratios", {})[name] = ratio
        if "ours" in out.get("ratios", {}):
            out["ratio_ours_over_best_open_clip"] = out["ratios"]["ours"]
    return out


def report(
    summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, prep: dict[str, Any]
) -> str:
    rows = []
    for name, r in summary["rows"].items():
        s = r["seconds_to_target"]
        curve = " ".join(f"{e['value']:.2f}" for e in runs[name][0]["epochs"])
        rows.append(
            [
                name,
                s["median"],
                f"{s['min']:.0f}-{s['max']:.0f}" if s["n"] else "-",
                r["reached"],
                r["epoch_reached"],
                curve,
            ]
        )
    d = prep["defaults"]
    lines = [
        (
            f"target: val {args.metric} >= {args.target}; schedule (ours' defaults, given to open_clip too): "
            f"batch {d['batch']}, {d['epochs']} epochs, warm-up {d['warmup']} steps, {d['workers']} workers; "
            f"ours lr {d['lr']:g}"
        ),
        common.table(["trainer", "seconds", "range", "reached", "epoch", f"{args.metric} per epoch (first run)"], rows),
    ]
    for name, ratio in summary.get("ratios", {}).items():
        lines.append(f"{name} / best open_clip ({summary['best_open_clip']}): {ratio:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(common.machine_line(), flush=True)
    if args.lrs is None:
        args.lrs = [5e-4, 1e-3, 2e-3] if "bf16" in common.native_precisions() else [5e-4]
    out = args.out or common.default_out("time_to_quality")
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-ttq-"))
    try:
        prep = prepare(args, tmp)
        from finderpartner.env import resolve_precision

        ours = resolve_precision("auto", __import__("torch").device("cpu"))
        print(
            f"data {prep['data']}; precision ours {ours} (auto), open_clip {prep['precision']}; open_clip lrs "
            f"{', '.join(f'{lr:g}' for lr in args.lrs)}",
            flush=True,
        )
        runs = alternate(args, prep, tmp)
        summary = summarise(runs)
        print("\n" + report(summary, runs, args, prep))
    finally:
        if args.keep:
            print(f"run folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "benchmark": "time_to_quality",
        "args": vars(args),
        "machine": common.machine_info(),
        "versions": common.package_versions(),
        "ours_defaults": prep["defaults"],
        "summary": summary,
        "runs": runs,
    }
    print(f"results: {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
