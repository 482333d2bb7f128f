"""Run every benchmark script in benchmarks/ plus the peer comparison, and write benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py [--full] [--only pack.py peers.py] [--peers-python PATH]

Each script prints its ratios on its last lines ("ratio ...", often with "(goal >= X)"); they are collected, goals
checked, and written with the machine's details. By default every script runs at reduced sizes (QUICK below) so
that the whole run takes about 20 minutes on 2 cores, half of it peers.py with its object-store leg; --full runs each with
its own defaults. peers.py runs under --peers-python (default .venv-bench/bin/python when it exists: the peers
need their own venv, see docs/bench.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
TIMEOUT_S = {"peers.py": 900, "autotune.py": 900, "plan_scale.py": 900, "stream_remote.py": 1200}  # seconds per script (default 300): one runaway must not eat the whole run

# Reduced sizes for the default run; scripts not listed run with their defaults.
QUICK: dict[str, list[str]] = {
    "pack.py": ["--per-class", "100", "--repeats", "2"],
    "pack_scale.py": ["--per-class", "100", "--repeats", "1"],
    "decode.py": ["--images", "600", "--rounds", "2"],
    "monitor_overhead.py": ["--pairs", "8"],
    "stream_local.py": ["--mb", "256", "--epochs", "2"],
    "integrity.py": ["--mb", "256", "--images", "256", "--rounds", "2"],
    "stream_remote.py": ["--latencies", "20", "80", "--pipeline-latencies", "20"],
    "worker_memory.py": ["--samples", "100000", "--epochs", "4"],
    "peers.py": ["--per-class", "100", "--rounds", "2"],
    "autotune.py": ["--epochs", "6", "--rounds", "2"],
}

# "...: 1.07x (goal >= 0.85x)": the figure stands right before its goal, with at most a unit between them.
_GOAL = re.compile(r"([0-9][0-9,]*\.?[0-9]*)\s*(?:x|%| MB| GB| s)?\s*\(goal:?\s*(>=|<=|<|>)\s*([0-9][0-9,]*\.?[0-9]*)")


@dataclass
class Outcome:
    script: str
    args: list[str]
    python: str
    seconds: float
    code: int | None  # None: timed out
    stdout: str
    stderr: str

    @property
    def ratios(self) -> list[str]:
        """The lines that report a ratio, or the last line when none says "ratio"."""
        lines = [line.strip() for line in self.stdout.splitlines() if line.strip()]
        found = [line for line in lines if line.lower().startswith("ratio") or "goal" in line.lower()]
        return found or lines[-1:]


def scripts() -> list[str]:
    """Benchmark scripts: every benchmarks/*.py except helpers (_*.py) and this runner."""
    return sorted(p.name for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def run_script(script: str, args: list[str], python: str) -> Outcome:
    """Run one script from the repository root with a time limit; never raises for the script's own failure."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, str(HERE / script), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=TIMEOUT_S.get(script, 300))
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = f"timed out after {TIMEOUT_S.get(script, 300)} s"
    return Outcome(script, args, python, time.perf_counter() - start, code, out, err)


def goal_check(line: str) -> str | None:
    """"yes"/"no" for a line whose figure stands right before "(goal OP X)"; "see line" for other goal lines."""
    if "goal" not in line.lower():
        return None
    match = _GOAL.search(line)
    if not match:
        return "see line"  # a goal stated some other way: leave the judgement to the reader, never guess
    number, op, target = float(match.group(1).replace(",", "")), match.group(2), float(match.group(3).replace(",", ""))
    met = {">=": number >= target, ">": number > target, "<=": number <= target, "<": number < target}[op]
    return "yes" if met else "**no**"


def machine(peers_python: str) -> list[tuple[str, str]]:
    """Rows of the machine table: what every figure depends on."""
    from stoker.perf.bench import machine_info

    info = machine_info()
    peer_torch = subprocess.run([peers_python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{info['cpu']}, {info['cores']} usable cores"),
        ("RAM", f"{info['ram_gib']} GiB"),
        ("GPU", info["gpu"] or "none"),
        ("Python", info["python"]),
        ("torch", f"{info['torch']} ({sys.executable}); peers.py: {peer_torch} ({peers_python})"),
        ("platform", info["platform"]),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def write_results(outcomes: list[Outcome], rows: list[tuple[str, str]], full: bool, total_s: float) -> None:
    """Write RESULTS.md: machine, goals, every ratio, then each script's output."""
    sizes = "each script's default sizes (--full)" if full else "reduced sizes (run_all.py QUICK)"
    lines = ["# Benchmark results", "",
             f"Written by `benchmarks/run_all.py` with {sizes}; the whole run took {total_s:,.0f} s. The machine "
             "may be shared with other jobs (see the load average), so compare the ratios of one run, each measured "
             "against a baseline taken in the same run, rather than absolute numbers across runs.", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "## Goals", "", "| script | line | met |", "|---|---|---|"]
    for o in outcomes:
        for ratio in o.ratios:
            check = goal_check(ratio)
            if check:
                lines.append(f"| {o.script} | {ratio} | {check} |")
    lines += ["", "## Every ratio", "", "| script | arguments | seconds | exit | ratios |", "|---|---|---|---|---|"]
    for o in outcomes:
        status = "timeout" if o.code is None else str(o.code)
        ratios = "<br>".join(o.ratios) or "(no output)"
        lines.append(f"| {o.script} | `{' '.join(o.args) or '-'}` | {o.seconds:,.0f} | {status} | {ratios} |")
    lines += ["", "## Output of each script", ""]
    for o in outcomes:
        python = os.path.relpath(o.python, REPO) if o.python.startswith(str(REPO)) else o.python
        lines += [f"### {o.script}", "", f"`{python} benchmarks/{o.script} {' '.join(o.args)}`", "",
                  "```text", *(o.stdout.strip().splitlines()[-40:] or ["(no output)"]), "```", ""]
        if o.code != 0:
            lines += ["stderr (last lines):", "", "```text", *o.stderr.strip().splitlines()[-15:], "```", ""]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each script's default sizes (takes much longer)")
    parser.add_argument("--only", nargs="*", default=None, help="script names to run, e.g. pack.py peers.py")
    bench_python = REPO / ".venv-bench" / "bin" / "python"
    parser.add_argument("--peers-python", default=str(bench_python) if bench_python.exists() else sys.executable)
    args = parser.parse_args()
    chosen = [s for s in scripts() if args.only is None or s in args.only]
    rows = machine(args.peers_python)
    outcomes = []
    start = time.perf_counter()
    for script in chosen:
        python = args.peers_python if script == "peers.py" else sys.executable
        extra = [] if args.full else QUICK.get(script, [])
        print(f"running {script} {' '.join(extra)} ...", flush=True)
        outcome = run_script(script, extra, python)
        outcomes.append(outcome)
        status = "timed out" if outcome.code is None else f"exit {outcome.code}"
        print(f"  {status} after {outcome.seconds:.0f} s: " + " | ".join(outcome.ratios), flush=True)
    write_results(outcomes, rows, args.full, time.perf_counter() - start)
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
