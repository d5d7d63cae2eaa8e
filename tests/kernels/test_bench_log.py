"""bench.tee_log: every message goes to stdout and is appended, line by line, to the run's log file."""

from bitsmith.kernels.bench import tee_log


def test_tee_log_prints_and_appends(tmp_path, capsys):
    out = tmp_path / "run"  # created by tee_log
    log = tee_log(str(out))
    log("first")
    assert (out / "bench.log").read_text() == "first\n"  # flushed before the next message
    tee_log(str(out))("second")  # a second run appends
    assert (out / "bench.log").read_text() == "first\nsecond\n"
    assert capsys.readouterr().out == "first\nsecond\n"
