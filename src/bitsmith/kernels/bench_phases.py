"""Run a benchmark's phases each in its own process under a time limit, so that a call on a lent GPU always comes
back with what it measured.

A phase that stalls (a kernel that never finishes, a compile that takes minutes, a worker pool waiting on a result
that never comes) is killed with its whole process group (its pool workers too) when its limit is reached; a few
seconds before, the phase dumps its Python stacks (`arm`, faulthandler), so the log says where it stood. Then the
next phase runs. The phases together never run past `budget_s`.

    results = run_phases([("compile", argv, 110), ("time", argv2, 120)], budget_s=280, log=print)
    # -> [{"phase": "compile", "rc": 0, "seconds": 71.2, "timed_out": False, "limit": 110}, ...]

    # inside a phase's process (its deadline arrives in BITSMITH_PHASE_DEADLINE, epoch seconds)
    arm()

Children get a new process group in the same session (not a new session: the GPU machine's tool ends a call's
leftover processes by session, and a phase left running would disturb the next call's timings); the supervisor
kills the current group on SIGTERM / SIGINT too (e.g. from an outer `timeout`).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

DEADLINE_ENV = "BITSMITH_PHASE_DEADLINE"
DUMP_MARGIN_S = 5.0  # stacks dumped this long before the kill


def seconds_left() -> float | None:
    """Seconds to this phase's deadline (None outside `run_phases`)."""
    env = os.environ.get(DEADLINE_ENV)
    return float(env) - time.time() if env else None


def arm(margin_s: float = DUMP_MARGIN_S) -> float | None:
    """Dump every thread's Python stack to stderr `margin_s` before the phase's deadline (its kill); returns the
    seconds left (None: no deadline known, nothing armed)."""
    left = seconds_left()
    if left is not None:
        faulthandler.dump_traceback_later(max(0.5, left - margin_s), exit=False)
    return left


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_phases(phases: Sequence[tuple[str, Sequence[str], float]], budget_s: float,
               log: Callable[[str], None] = print, env: dict | None = None) -> list[dict]:
    """Run each (name, argv, limit_s) in turn, each limited to min(limit_s, what is left of budget_s)."""
    t0 = time.monotonic()
    current: list[subprocess.Popen] = []
    results = []

    def stop(signum, frame):  # an outer timeout: take the running phase down with us
        for p in current:
            _kill_group(p)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name, argv, limit_s in phases:
            left = budget_s - (time.monotonic() - t0)
            limit = min(float(limit_s), left)
            if left < 2 * DUMP_MARGIN_S:
                log(f"phase {name}: skipped, {left:.0f} s of the budget left")
                results.append(dict(phase=name, rc=None, seconds=0.0, timed_out=False, limit=limit, skipped=True))
                continue
            log(f"phase {name}: start (limit {limit:.0f} s)")
            t = time.monotonic()
            child_env = dict(env or os.environ, **{DEADLINE_ENV: f"{time.time() + limit:.1f}"})
            p = subprocess.Popen(list(argv), env=child_env, process_group=0)
            current.append(p)
            timed_out = False
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
                rc = p.wait()
            _kill_group(p)  # workers it left behind
            current.remove(p)
            dt = time.monotonic() - t
            log(f"phase {name}: " + (f"TIME LIMIT {limit:.0f} s reached, killed (its stacks are above)" if timed_out
                                     else f"done, rc {rc}") + f", {dt:.0f} s")
            results.append(dict(phase=name, rc=rc, seconds=round(dt, 1), timed_out=timed_out, limit=round(limit)))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return results


def python_argv(script: str, *args: str) -> list[str]:
    """argv running `script` with this interpreter, unbuffered (progress lines arrive as they are printed)."""
    return [sys.executable, "-u", script, *args]


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path`, atomically (a phase killed mid-write leaves the previous file, never half of one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def supervise(script: str, argv: Sequence[str], phases: str, limits: str, budget_s: float, out: str,
              summary: Callable[[str], str], log: Callable[[str], None] = print) -> int:
    """The supervisor side of a phased benchmark: run `script` once per phase of `phases` ("compile,time,check"),
    each as `script *argv --phase NAME` under its limit from `limits` ("compile=110,time=120,check=60") and the
    whole `budget_s`; then write out/phases.json and out/table.md (`summary(out)`, also printed). 0 when every
    phase exited 0. The child side: `arm()`, then the phase's own code."""
    os.environ.setdefault("BITSMITH_BENCH_T0", str(time.time()))
    limit = {k: float(v) for k, v in (kv.split("=") for kv in limits.split(","))}
    runs = [(p, python_argv(os.path.abspath(script), *argv, "--phase", p), limit[p]) for p in phases.split(",")]
    res = run_phases(runs, budget_s, log)
    write_json(os.path.join(out, "phases.json"), res)
    text = summary(out)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    log("phases: " + ", ".join(f"{r['phase']} {'TIMEOUT' if r['timed_out'] else r['rc']} {r['seconds']:.0f} s"
                               for r in res))
    return 0 if all(r["rc"] == 0 for r in res) else 1


def dispatch(script: str, args, argv: Sequence[str], phase_fns: dict[str, Callable], setup: Callable[[], None],
             summary: Callable[[str], str], log: Callable[[str], None], t0: float) -> int:
    """A phased benchmark's main after its arguments are parsed: in a child (`args.phase` set) `arm()`, `setup()`
    (e.g. pick the device) and run that phase; in the supervisor run every phase as a child (`supervise`), the
    children's clock starting at `t0` (BITSMITH_BENCH_T0)."""
    if args.phase:
        arm()
        setup()
        return phase_fns[args.phase](args)
    os.environ["BITSMITH_BENCH_T0"] = str(t0)
    return supervise(script, argv, args.phases, args.limits, args.budget, args.out, summary, log)


def add_arguments(ap, out: str, budget_s: float, limits: str, phases: str = "compile,time,check") -> None:
    """The options every phased benchmark takes: --out, --workers, --budget, --limits, --phases, --smoke and the
    hidden --phase (the supervisor's children)."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--budget", type=float, default=budget_s, help="seconds for all phases together")
    ap.add_argument("--limits", default=limits, help="per-phase seconds")
    ap.add_argument("--phases", default=phases)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)  # run one phase (the supervisor's children)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: the flow only")
