"""bench_phases: a phase that stalls is killed at its limit with its process group (a worker it started too), its
Python stacks are dumped first, and the phases after it still run; the budget caps the limits."""

import json
import os
import sys
import time

from bitsmith.kernels import bench_phases as bph

_STALL = """
import subprocess, sys, time
from bitsmith.kernels.bench_phases import arm
arm(margin_s=1.5)
w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(w.pid))
print("stalling", flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie holds nothing
    except FileNotFoundError:
        return True


def test_stalled_phase_is_killed_and_next_runs(tmp_path, capfd):
    pidfile = tmp_path / "worker.pid"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    lines = []
    t0 = time.monotonic()
    res = bph.run_phases([("first", [sys.executable, "-c", "print('first ran')"], 30),
                          # 15 s: the child imports bitsmith (and torch) before it prints, slow on a loaded machine
                          ("stall", [sys.executable, "-c", _STALL, str(pidfile)], 15),
                          ("after", [sys.executable, "-c", "print('after ran')"], 30)],
                         budget_s=60, log=lines.append, env=env)
    took = time.monotonic() - t0
    assert [r["phase"] for r in res] == ["first", "stall", "after"]
    assert res[0]["rc"] == 0 and not res[0]["timed_out"]
    assert res[1]["timed_out"] and res[2]["rc"] == 0
    assert took < 45
    out, err = capfd.readouterr()
    assert "first ran" in out and "after ran" in out and "stalling" in out
    assert "Timeout" in err and 'File "<string>", line 8' in err  # faulthandler's dump: the stall's sleep
    assert any("TIME LIMIT" in line for line in lines)
    deadline = time.monotonic() + 5
    pid = int(pidfile.read_text())
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the stalled phase's worker survived"


def test_budget_caps_and_skips(capfd):
    lines = []
    res = bph.run_phases([("a", [sys.executable, "-c", "import time; time.sleep(30)"], 100),
                          ("b", [sys.executable, "-c", "pass"], 100)], budget_s=11, log=lines.append)
    assert res[0]["timed_out"] and res[0]["limit"] <= 11
    assert res[1].get("skipped")
    assert any("skipped" in line for line in lines)


def test_arm_reads_the_deadline_from_the_environment(monkeypatch):
    monkeypatch.setenv(bph.DEADLINE_ENV, str(time.time() + 100))
    try:
        assert 98 < bph.arm() <= 100
    finally:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
    monkeypatch.delenv(bph.DEADLINE_ENV)
    assert bph.arm() is None


_PHASED = """
import sys
args = sys.argv[1:]
phase = args[args.index("--phase") + 1]
open(args[0] + "/" + phase, "w").write(phase)
sys.exit(3 if phase == "bad" else 0)
"""


def test_supervise_runs_each_phase_as_a_child_and_writes_the_record(tmp_path, capsys, monkeypatch):
    script = tmp_path / "phased.py"
    script.write_text(_PHASED)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    rc = bph.supervise(str(script), [str(out)], "one,two", "one=30,two=30", 60, str(out),
                       summary=lambda d: "table of " + ",".join(sorted(os.listdir(d))), log=lines.append)
    assert rc == 0 and (out / "one").read_text() == "one" and (out / "two").read_text() == "two"
    assert [r["phase"] for r in json.loads((out / "phases.json").read_text())] == ["one", "two"]
    assert (out / "table.md").read_text() == "table of one,phases.json,two\n"
    assert "table of" in capsys.readouterr().out and lines[-1] == "phases: one 0 0 s, two 0 0 s"
    assert bph.supervise(str(script), [str(out)], "bad", "bad=30", 60, str(out), summary=str, log=lines.append) == 1


def test_dispatch_runs_the_named_phase_in_a_child_after_setup(tmp_path, monkeypatch):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(bph, "arm", lambda: calls.append("arm"))
    args = SimpleNamespace(phase="time", out=str(tmp_path))
    fns = {"time": lambda a: calls.append(("time", a.out)) or 7, "check": lambda a: calls.append("check")}
    assert bph.dispatch("x.py", args, [], fns, lambda: calls.append("setup"), str, print, 0.0) == 7
    assert calls == ["arm", "setup", ("time", str(tmp_path))]
