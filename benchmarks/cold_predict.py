"""One predict call in a fresh process, with the run's export and with Keras, for the tasks
that sample or decode: a caption of one photo, 25 names, 64 faces.

    python benchmarks/cold_predict.py --runs-dir RUNS --image PHOTO.jpg --repeats 5

RUNS holds a finished, exported run of caption, names and gan (`dlcli export TASK`); each
call is `dlcli predict TASK ... --runs-dir RUNS --json`, the default engine (the export) and
`--engine keras` taking turns, after one warm-up call each, beside `dlcli --version` (the
CLI's start-up alone). Prints each median with the commands and writes the rows as JSON
(`--json-out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import dlcli_cmd, interleaved, machine_facts, median, run_measured, write_json  # noqa: E402

TARGETS = {"caption": 1.0, "names": 0.6, "gan": 0.6}  # seconds, with the export


def calls(runs: Path, image: str, out: Path) -> dict[str, list[str]]:
    """task -> predict's arguments (without the engine)."""
    return {"caption": ["predict", "caption", image],
            "names": ["predict", "names", "--n", "25", "--seed", "1"],
            "gan": ["predict", "gan", "--n", "64", "--seed", "1", "--out", str(out)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--image", required=True, help="the photo to caption")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tasks", default="caption,names,gan")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    runs = Path(args.runs_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlcli-cold-") as tmp:
        floor = interleaved({"version": lambda: run_measured(dlcli_cmd("--version"), timeout=60).check("dlcli --version").wall},
                            repeats=args.repeats, warmup=1)["version"]
        rows.append({"task": "-", "command": "dlcli --version", "export_s": round(median(floor), 3)})
        print(f"floor    dlcli --version {median(floor):.3f} s (the CLI's start-up alone)", flush=True)
        for task in args.tasks.split(","):
            base = calls(runs, args.image, Path(tmp) / task)[task] + ["--runs-dir", str(runs), "--json"]
            engines = {"export": base, "keras": base + ["--engine", "keras"]}

            def timed(cmd):
                return lambda: run_measured(dlcli_cmd(*cmd), timeout=600).check(" ".join(cmd)).wall

            times = interleaved({k: timed(v) for k, v in engines.items()}, repeats=args.repeats, warmup=1)
            lite, keras = median(times["export"]), median(times["keras"])
            rows.append({"task": task, "command": "dlcli " + " ".join(base), "export_s": round(lite, 3),
                         "keras_s": round(keras, 3), "ratio": round(lite / keras, 3), "target_s": TARGETS.get(task),
                         "holds": lite <= TARGETS.get(task, float("inf")),
                         "export_all": [round(t, 3) for t in times["export"]],
                         "keras_all": [round(t, 3) for t in times["keras"]]})
            print(f"{task:8} export {lite:.3f} s   keras {keras:.3f} s   ({lite / keras:.2f})   "
                  f"target <= {TARGETS.get(task)} s: {'yes' if rows[-1]['holds'] else 'no'}", flush=True)
    if args.json_out:
        write_json(Path(args.json_out), {"machine": machine_facts(), "rows": rows})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
