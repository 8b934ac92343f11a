"""dlcli's benchmark suite: one command, one table, one JSON file.

    python benchmarks/run.py                       # everything (under 15 minutes on 2 cores)
    python benchmarks/run.py --quick               # smaller data, fewer repetitions
    python benchmarks/run.py --task mnist          # one task (plus start-up)
    python benchmarks/run.py --data "$DLCLI_SHARED_DATA" --json-out benchmarks/results/latest.json
    python benchmarks/run.py --skip startup,training,pipeline,predict,memory,realistic   # only `dlcli serve` (benchmarks/serve.py)
    python benchmarks/run.py --skip startup,training,pipeline,predict,memory,serve --data DIR   # only the full-size training rows

Data: `--data DIR` or $DLCLI_SHARED_DATA (the shared real data sets); generated where absent.
Every figure is measured in a child process beside its reference, in the same run, with
repetitions interleaved; the table shows medians and ratios. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import datasets  # noqa: E402
from benchmarks.common import (BENCH, PYTHON, dlcli_cmd, interleaved, machine_facts, median,  # noqa: E402
                               run_measured, shared_data, write_json)

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\b")
KERAS_TASKS_WITH_REFERENCE = ("mnist", "names", "cnn", "autoencoder", "gan", "finetune", "caption")
ROWS: list[dict] = []


def row(section, task, figure, value, unit, reference=None, ref_label="", ratio=None, target=None, note=""):
    holds = None
    if target is not None and ratio is not None:
        op, bound = target
        holds = ratio >= bound if op == ">=" else ratio <= bound
    r = {"section": section, "task": task, "figure": figure, "value": value, "unit": unit,
         "reference": reference, "reference_label": ref_label, "ratio": ratio,
         "target": f"{target[0]} {target[1]}" if target else "", "holds": holds, "note": note}
    ROWS.append(r)
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else value
    print(f"  {section:10} {task:12} {figure:34} {shown} {unit}" + (f"  ratio {ratio:.3f}" if ratio is not None else ""), flush=True)
    return r


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def worker(*args, timeout=600):
    return run_measured([PYTHON, str(BENCH / "workers.py"), *args], timeout=timeout)


# -- training throughput + peak memory ----------------------------------------------------


def epoch_times(result, after: int = 1) -> list[float]:
    """Seconds between successive `epoch N/E` lines of a dlcli run, for the epochs after
    epoch `after` (the first: its tracing is excluded)."""
    stamps = {}
    for t, line in result.lines:
        m = EPOCH_LINE.match(line.strip())
        if m:
            stamps[int(m.group(1))] = t
    keys = sorted(stamps)
    return [stamps[b] - stamps[a] for a, b in zip(keys, keys[1:]) if b == a + 1 and a >= after]


def timed_after(task, spec) -> int:
    """The epoch whose end starts the timed epochs: finetune's first of phase 2 (its phase 1
    is a head on cached features; the boundary builds and traces the whole network), else 1."""
    return spec["flags"]["head_epochs"] + 1 if task == "finetune" else 1


def train_specs(tmp: Path, shared: Path | None, quick: bool, epochs: int) -> dict:
    """task -> {"flags": config overrides for dlcli and the reference, "args": extra dlcli args}."""
    q = 0 if quick else 1
    specs = {}
    specs["linear"] = {"flags": {"epochs": epochs}}
    npz = datasets.mnist_npz(tmp, shared, datasets.SIZES["mnist"][q], 2000)
    specs["mnist"] = {"flags": {"dataset": f"npz:{npz}", "epochs": epochs, "val_size": 2000}}
    txt = datasets.names_text(tmp, shared, datasets.SIZES["names"][q])
    specs["names"] = {"flags": {"dataset": f"text:{txt}", "epochs": epochs, "samples": 16}}
    n = datasets.SIZES["cnn"][q]
    folder = datasets.image_folder(tmp, "cifar", shared / "cifar10" if shared else None, n + 256, 100)
    specs["cnn"] = {"flags": {"dataset": f"folder:{folder}", "epochs": epochs, "val_size": 256}}
    # finetune also in --quick: its predict and cold-start rows need a trained model. Timed:
    # phase 2's epochs after its first (see timed_after): three of its epochs of 100 photos (one in --quick),
    # whose median a single epoch's noise (or the last epoch's checkpoint) does not decide.
    flowers = datasets.image_folder(tmp, "flowers", shared / "flowers" if shared else None, 100, 25,
                                    size=256, splits=("train", "val"))
    specs["finetune"] = {"flags": {"dataset": f"folder:{flowers}", "epochs": 3 if quick else 5, "head_epochs": 1,
                                   "weights": "none"}}
    if not quick:
        faces = datasets.faces_folder(tmp, shared, 600)
        specs["autoencoder"] = {"flags": {"dataset": f"folder:{faces}", "epochs": 2}}
        specs["gan"] = {"flags": {"dataset": f"folder:{faces}", "epochs": 3, "kid_samples": 100}}
        caps = datasets.captions_folder(tmp, shared, 60)
        if caps:
            specs["caption"] = {"flags": {"dataset": f"captions:{caps}", "epochs": 3, "weights": "none",
                                          "min_word_count": 2}}
    return specs


# The realistic section: each task on its shared data set at full size, with the task's own
# defaults for everything else (its validation split, KID samples, cached views), a warm-up
# epoch and then timed epochs: one for cnn's and gan's long ones, two or three for the others
# (names's short epochs wander by a fifth, so it takes three; finetune: its head epoch, the
# boundary epoch, three timed).
REALISTIC = {  # task -> (data set under the shared folder, epochs, config overrides)
    "mnist": ("npz:mnist/mnist.npz", 3, {}),
    "names": ("text:names/ssa_names.txt", 4, {"samples": 16}),
    "cnn": ("folder:cifar10", 2, {}),
    "autoencoder": ("folder:lfw", 3, {}),
    "gan": ("folder:lfw", 2, {}),
    "finetune": ("folder:flowers", 5, {"head_epochs": 1, "weights": "none"}),
    "caption": ("captions:flickr8k", 3, {"weights": "none"}),
}
REALISTIC_TIMEOUT = 2400  # seconds a process: gan's two epochs on 10,700 faces take minutes


def realistic_specs(tmp: Path, shared: Path | None, quick: bool = False, epochs: int = 0) -> dict:
    """task -> spec of the realistic section: `train_specs`' form, on the shared data sets at full
    size (mnist's 60,000 digits, CIFAR-10's 50,000 training images, LFW's 11,941 faces, the 1,000
    flower photos, Flickr8k's 800 photos); {} without them."""
    if shared is None:
        return {}
    specs = {}
    for task, (dataset, task_epochs, flags) in REALISTIC.items():
        kind, _, path = dataset.partition(":")
        if (shared / path).exists():
            specs[task] = {"flags": {"dataset": f"{kind}:{shared / path}", "epochs": task_epochs, **flags}}
    return specs


def dlcli_train(task, spec, ckpt: Path, run_name: str, timeout=600):
    args = ["train", task, "--runs-dir", str(ckpt), "--run", run_name, "--json"]
    for k, v in spec["flags"].items():
        args += ["--set", f"{k}={v}"] if k not in ("epochs", "dataset") else [f"--{k}", str(v)]
    return run_measured(dlcli_cmd(*args), timeout=timeout)


def bench_training(task, spec, ckpt: Path, rounds: int, timeout: int | None = None) -> dict:
    """Interleaved rounds of `dlcli train` and the plain Keras script; median epoch time each."""
    out = {"dlcli_epochs": [], "ref_epochs": [], "dlcli_rss": [], "ref_rss": [], "examples": None}
    has_ref = task in KERAS_TASKS_WITH_REFERENCE
    for r in range(rounds):
        order = ["dlcli", "ref"] if r % 2 == 0 else ["ref", "dlcli"]
        for side in order:
            if side == "dlcli":
                res = dlcli_train(task, spec, ckpt, f"bench-{r}",
                                  timeout=timeout or (300 if task not in KERAS_TASKS_WITH_REFERENCE + ("linear",) else 600))
                if res.rc != 0:
                    raise RuntimeError(f"dlcli train {task} failed (exit {res.rc}): " + " | ".join(res.stderr.strip().splitlines()[-3:]))
                out.setdefault("dlcli_rounds", []).append(epoch_times(res, timed_after(task, spec)))
                out["dlcli_epochs"] += out["dlcli_rounds"][-1]
                out["dlcli_rss"].append(res.maxrss_mb)
                out["dlcli_wall"] = res.wall
            elif has_ref:
                res = worker("reference", task, "--spec", json.dumps(spec), timeout=timeout or 600).check(f"reference {task}")
                data = res.json()
                ends = data["epoch_ends"]
                out.setdefault("ref_rounds", []).append([b - a for a, b in zip(ends, ends[1:])])
                out["ref_epochs"] += out["ref_rounds"][-1]
                out["ref_rss"].append(res.maxrss_mb)
                out["examples"] = data["examples"]
    return out


def report_training(task, m, section="training"):
    d, rf = median(m["dlcli_epochs"]), median(m["ref_epochs"])
    n = m["examples"]
    if n and d and rf:
        dl, ref = n / d, n / rf
        # Each round's own ratio too: a round's two processes run minutes apart at most, so
        # their spread says how far the machine drifted meanwhile.
        each = [median(r) / median(d) for d, r in zip(m.get("dlcli_rounds", []), m.get("ref_rounds", []))
                if median(d) and median(r)]
        row(section, task, "train examples/s (dlcli vs Keras)", dl, "ex/s", ref, "plain model.fit", dl / ref, (">=", 0.95),
            note=f"median of {len(m['dlcli_epochs'])}/{len(m['ref_epochs'])} epochs after the first"
                 + (" of phase 2" if task == "finetune" else "") + f", {n:,} examples an epoch"
                 + (f"; each round's ratio {', '.join(f'{x:.2f}' for x in each)}" if len(each) > 1 else ""))
        m["dlcli_throughput"] = dl
    elif d:
        row("training", task, "seconds per epoch (dlcli)", d, "s", note="no plain-Keras reference for this task yet")
    elif m.get("dlcli_wall"):
        row("training", task, "whole run (dlcli)", m["dlcli_wall"], "s", note="task has no epoch lines (NumPy)")
    peak = max(m["dlcli_rss"]) if m["dlcli_rss"] else None
    ref_peak = max(m["ref_rss"]) if m["ref_rss"] else None
    if peak:
        row("memory" if section == "training" else section, task, "peak RSS of dlcli train", peak, "MB", ref_peak, "plain Keras script" if ref_peak else "",
            peak / ref_peak if ref_peak else None)


def bench_realistic(tasks: list[str], tmp: Path, shared: Path, rounds: int, started: float, task_seconds: dict) -> None:
    """The training rows again on each task's shared data set at full size (`realistic_specs`),
    dlcli and the plain Keras script taking turns as in the training section."""
    specs = realistic_specs(tmp, shared)
    for task in tasks:
        if task not in specs:
            continue
        log(f"== realistic {task}  ({time.perf_counter() - started:.0f}s so far)")
        task_started = time.perf_counter()
        try:
            measured = bench_training(task, specs[task], tmp / "checkpoints-realistic", rounds, timeout=REALISTIC_TIMEOUT)
            report_training(task, measured, section="realistic")
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the suite
            row("error", task, "realistic benchmark failed", str(exc)[:300], "")
            log(f"   realistic {task} failed: {exc}")
        task_seconds[f"realistic {task}"] = round(time.perf_counter() - task_started, 1)


# -- input pipeline -----------------------------------------------------------------------


def bench_pipeline(task, spec, train_throughput, repeats):
    res = worker("pipeline", task, "--spec", json.dumps(spec), "--repeats", str(repeats))
    if res.rc != 0:
        row("pipeline", task, "input pipeline", "failed", "", note=res.stderr.strip().splitlines()[-1][:120])
        return
    data = res.json()
    first = data["examples"] / data["first_epoch_s"]
    later = data["examples"] / median(data["later_epoch_s"])
    ratio = first / train_throughput if train_throughput else None
    row("pipeline", task, "files -> batches, first epoch", first, "ex/s", train_throughput, "dlcli training ex/s", ratio,
        (">=", 3.0) if ratio else None, note="read + decode + preprocess + batch, from disk")
    row("pipeline", task, "cached epochs (shuffle+batch)", later, "ex/s", train_throughput, "dlcli training ex/s",
        later / train_throughput if train_throughput else None, (">=", 3.0) if train_throughput else None)


# -- prediction ---------------------------------------------------------------------------


def bench_predict(task, model: Path, images: list[str], tmp: Path, repeats: int, spec: dict | None = None):
    """1,000 files in one call (Keras, and the run's export through LiteRT) against model.predict
    in memory; the same call as a fresh process; one file in a fresh process (cold start)."""
    listing = tmp / f"{task}-images.txt"
    listing.write_text("\n".join(images))
    run_measured(dlcli_cmd("export", task, "--checkpoint", str(model), "--format", "tflite"), timeout=600).check(f"dlcli export {task}")
    tflite = model.parent / "export" / "model.tflite"

    def call(files, checkpoint):
        def go():
            res = run_measured(dlcli_cmd("predict", task, "--checkpoint", str(checkpoint), "--json", *files), timeout=600)
            res.check(f"dlcli predict {task}")
            return res.wall
        return go

    times = interleaved({"many": call(images, tflite), "one": call(images[:1], tflite),
                         "one-keras": call(images[:1], model)}, repeats=repeats, warmup=1)
    ref_args = ["--model", str(model), "--images", str(listing), "--spec", json.dumps(spec or {})]
    ref = worker("predict-ref", task, *ref_args, "--repeats", "2" if task == "finetune" else "5").check("predict-ref").json()
    ref_rate = ref["images"] / median(ref["seconds"])
    decode_rate = ref["images"] / median(ref["decode_seconds"])
    row("predict", task, f"reading and decoding the {len(images)} files alone (Pillow, one thread, no model)", decode_rate,
        "img/s", ref_rate, "model.predict in memory", decode_rate / ref_rate,
        note="the part of predict the in-memory reference leaves out; median of 3 (finetune: 1)")
    cli_repeats = "1" if task == "finetune" else str(max(2, repeats))
    for engine, label in (("lite", "export, LiteRT"), ("keras", "Keras")):
        cli = worker("predict-cli", task, *ref_args, "--engine", engine, "--repeats", cli_repeats).check("predict-cli").json()
        in_proc = cli["images"] / median(cli["many_s"])
        row("predict", task, f"dlcli predict, {len(images)} files, one call ({label})", in_proc, "img/s", ref_rate,
            "model.predict in memory", in_proc / ref_rate, (">=", 0.8),
            note=f"the CLI in a warm process: load the model + decode files + predict + JSON; "
                 f"a 1-file call takes {median(cli['one_s']):.2f}s")
    many = median(times["many"])
    end_to_end = len(images) / many
    row("predict", task, f"dlcli predict, {len(images)} files, fresh process (export)", end_to_end, "img/s", ref_rate,
        "model.predict in memory", end_to_end / ref_rate, note=f"{many:.1f}s including Python start-up")
    one, one_keras = median(times["one"]), median(times["one-keras"])
    row("latency", task, "one image, fresh process (export, LiteRT)", one, "s", one_keras, "the same with Keras",
        one / one_keras, ("<=", 0.6 / one_keras), note="cold start: start-up + model load + decode + predict; target <= 0.6 s")
    ROWS[-1]["holds"], ROWS[-1]["target"] = one <= 0.6, "<= 0.6 s"
    return one


def bench_stream_memory(task: str, model: Path, images: list[str], tmp: Path, sizes=(1000, 100_000)):
    """Peak RSS of `dlcli predict TASK DIR --jsonl` over N small files (hard links of the same
    1,000 images), for the run's export and for Keras: it must stay flat as N grows."""
    first = {}
    for n in sizes:
        folder = tmp / f"stream-{n}"
        for i in range(n):
            target = folder / f"{i // 1000:04d}" / f"{i:06d}{Path(images[i % len(images)]).suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(images[i % len(images)], target)
            except OSError:
                shutil.copyfile(images[i % len(images)], target)
        for engine in ("lite", "keras"):
            checkpoint = model.parent / "export" / "model.tflite" if engine == "lite" else model
            res = run_measured(dlcli_cmd("predict", task, "--checkpoint", str(checkpoint), str(folder), "--jsonl"),
                               timeout=1200)
            res.check(f"dlcli predict {task} --jsonl over {n} files")
            lines = res.stdout.count("\n")
            assert lines == n, f"{lines} lines for {n} files"
            first.setdefault(engine, res.maxrss_mb)
            row("memory", task, f"peak RSS, predict --jsonl, {n:,} files ({engine})", res.maxrss_mb, "MB",
                first[engine], f"the same over {sizes[0]:,} files", res.maxrss_mb / first[engine],
                note=f"{n / res.wall:,.0f} files/s in {res.wall:.0f}s; target: within a few hundred MB of {sizes[0]:,} files")
            ROWS[-1]["holds"] = res.maxrss_mb - first[engine] <= 300
            ROWS[-1]["target"] = "<= +300 MB"
        shutil.rmtree(folder, ignore_errors=True)


def bench_latency(task, model_args: list[str], image: str, repeats: int, extra=()):
    def go():
        res = run_measured(dlcli_cmd("predict", task, *model_args, "--json", *extra, image), timeout=600)
        res.check(f"dlcli predict {task}")
        return res.wall
    times = interleaved({"one": go}, repeats=repeats, warmup=1)["one"]
    row("latency", task, "one image end to end" + (f" ({' '.join(extra)})" if extra else ""), median(times), "s",
        note="fresh process: start-up + model load + decode + predict")


# -- start-up -----------------------------------------------------------------------------


def bench_startup(repeats):
    cmds = {
        "python -c pass": [PYTHON, "-c", "pass"],
        'python -c "import tensorflow"': [PYTHON, "-c", "import tensorflow"],
        "dlcli --help": dlcli_cmd("--help"),
        "dlcli tasks": dlcli_cmd("tasks", "--runs-dir", tempfile.gettempdir() + "/dlcli-bench-none"),
    }

    def timed(cmd):
        return lambda: run_measured(cmd, timeout=120).check(" ".join(cmd)).wall

    times = interleaved({k: timed(v) for k, v in cmds.items()}, repeats=repeats, warmup=1)
    base, tf_time = median(times["python -c pass"]), median(times['python -c "import tensorflow"'])
    row("start-up", "-", "python -c pass", base, "s")
    row("start-up", "-", 'python -c "import tensorflow"', tf_time, "s")
    for name in ("dlcli --help", "dlcli tasks"):
        t = median(times[name])
        row("start-up", "-", name, t, "s", tf_time, "import tensorflow", t / tf_time, ("<=", 0.5 / tf_time),
            note=f"target < 0.5 s; {t - base:.2f}s above bare python; holds={t < 0.5}")
        ROWS[-1]["holds"] = t < 0.5
        ROWS[-1]["target"] = "< 0.5 s"


# -- table --------------------------------------------------------------------------------


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def markdown_table(rows) -> str:
    lines = ["| section | task | figure | value | reference | ratio | target | holds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{fmt(r['reference'])} ({r['reference_label']})" if r["reference"] is not None else ""
        holds = {True: "yes", False: "**no**", None: ""}[r["holds"]]
        lines.append(f"| {r['section']} | {r['task']} | {r['figure']} | {fmt(r['value'])} {r['unit']} | {ref} | "
                     f"{fmt(r['ratio'])} | {r['target']} | {holds} |")
    return "\n".join(lines)


def bench_serve(tasks: list[str], shared: Path | None, quick: bool) -> None:
    """`benchmarks/serve.py`: `dlcli serve` with 8 and 32 clients against in-memory predict, and the load run."""
    from benchmarks import serve as serve_bench

    argv = ["--tasks", ",".join(tasks), "--requests", "1500" if quick else "3000"]
    if shared:
        argv += ["--data", str(shared)]
    for r in serve_bench.main(argv):
        if "ratio" in r:
            row("serve", r["task"], f"{r['clients']} clients, 1 image a request", r["per_s"], "img/s",
                r["reference_per_s"], "model.predict in memory", r["ratio"], (">=", 0.9),
                note=f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors")
        elif "clients" in r:
            row("serve", r["task"], "1 client: p50 / p99 latency", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", "ms")
        elif "load_requests" in r:
            row("serve", r["task"], f"load: {r['load_requests']} requests, 32 clients: errors", r["errors"], "")
            row("serve", r["task"], "load: server RSS at 1,000 requests / at the end",
                f"{r['rss_mb_at_1000']:.0f} / {r['rss_mb_at_end']:.0f}", "MB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help="only this task (start-up is always measured)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer repetitions")
    p.add_argument("--data", help="shared data folder (default: $DLCLI_SHARED_DATA; generated if absent)")
    p.add_argument("--json-out", default=str(BENCH / "results" / "latest.json"))
    p.add_argument("--rounds", type=int, help="rounds of each measurement (default 2, --quick 1): training "
                   "alternates dlcli and its reference each round, so more rounds, less drift in its ratios")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                   "startup,training,pipeline,predict,memory,realistic,serve")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    from dlcli.tasks import TASK_NAMES

    shared = shared_data(args.data)
    facts = machine_facts()
    facts.update({"mode": "quick" if args.quick else "full", "shared_data": str(shared) if shared else "generated"})
    print("dlcli benchmarks: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)

    importable, skipped = [], {}
    for name in TASK_NAMES:
        res = run_measured([PYTHON, "-c", f"import dlcli.tasks.{name}"], timeout=120)
        (importable.append(name) if res.rc == 0 else skipped.__setitem__(name, res.stderr.strip().splitlines()[-1:]))
    tasks = [t for t in importable if not args.task or t == args.task]
    if args.task and args.task not in importable:
        sys.exit(f"task {args.task!r} is not available: {skipped.get(args.task, 'unknown task')}")

    rounds = args.rounds or (1 if args.quick else 2)
    epochs = 3 if args.quick else 4
    with tempfile.TemporaryDirectory(prefix="dlcli-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ckpt = tmp / "checkpoints"
        if "startup" not in skip:
            log("== start-up")
            bench_startup(3 if args.quick else 7)
        specs = train_specs(tmp, shared, args.quick, epochs)
        task_seconds = facts["task_seconds"] = {}  # where the suite's time goes
        for task in tasks:
            if task not in specs:
                skipped[task] = ["not measured in --quick mode" if args.quick else "no benchmark recipe"]
                continue
            log(f"== {task}  ({time.perf_counter() - started:.0f}s so far)")
            task_started = time.perf_counter()
            measured = {}
            try:
                if "training" not in skip:
                    measured = bench_training(task, specs[task], ckpt, rounds if task in KERAS_TASKS_WITH_REFERENCE else 1)
                    report_training(task, measured)
                if "pipeline" not in skip and task in ("linear", "mnist", "names", "cnn"):
                    bench_pipeline(task, specs[task], measured.get("dlcli_throughput"), 2)
                model = ckpt / task / "bench-0" / "model.keras"
                if "predict" not in skip and model.exists():
                    if task == "mnist":
                        imgs = datasets.mnist_images(tmp, Path(specs["mnist"]["flags"]["dataset"][4:]))
                        bench_predict(task, model, imgs, tmp, rounds)
                        if "memory" not in skip:
                            bench_stream_memory(task, model, imgs, tmp, (1000, 100_000))
                    elif task == "cnn":
                        imgs = datasets.flat_images(Path(specs["cnn"]["flags"]["dataset"][7:]) / "train", 1000)
                        bench_predict(task, model, imgs, tmp, rounds)
                    elif task == "finetune":
                        # 224x224 with the mirror pass: 1,000 files take minutes per call here
                        imgs = datasets.flat_images(Path(specs["finetune"]["flags"]["dataset"][7:]), 200 if args.quick else 1000)
                        bench_predict(task, model, imgs, tmp, 1, spec=specs["finetune"])
                    elif task == "caption":
                        img = datasets.flat_images(Path(specs["caption"]["flags"]["dataset"][9:]) / "images", 1)[0]
                        bench_latency(task, ["--checkpoint", str(model)], img, rounds, extra=("--beam", "5"))
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the suite
                row("error", task, "benchmark failed", str(exc)[:300], "")
                log(f"   {task} failed: {exc}")
            task_seconds[task] = round(time.perf_counter() - task_started, 1)
        if "realistic" not in skip:
            if args.quick:
                skipped["realistic"] = ["left out in --quick mode (the full data sets take about 25 minutes)"]
            elif shared is None:
                skipped["realistic"] = ["needs the shared data sets (--data DIR)"]
            else:
                bench_realistic([t for t in tasks if t in REALISTIC], tmp, shared, rounds, started, task_seconds)
        serve_tasks = [t for t in ("mnist", "cnn") if t in tasks]
        if "serve" not in skip and serve_tasks:
            log(f"== serve  ({time.perf_counter() - started:.0f}s so far)")
            serve_started = time.perf_counter()
            try:
                bench_serve(serve_tasks, shared, args.quick)
            except Exception as exc:  # noqa: BLE001
                row("error", "serve", "benchmark failed", str(exc)[:300], "")
                log(f"   serve failed: {exc}")
            task_seconds["serve"] = round(time.perf_counter() - serve_started, 1)
    facts["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = markdown_table(ROWS)
    print()
    print(table)
    if skipped:
        print("\nnot measured: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in skipped.items()))
    print(f"\nsuite time {facts['elapsed_s']:.0f}s; per task: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in facts.get("task_seconds", {}).items()))
    write_json(Path(args.json_out), {"machine": facts, "rows": ROWS, "skipped": skipped, "table_markdown": table})
    print(f"written {args.json_out}")


if __name__ == "__main__":
    main()
