"""The suite's own per-test time limit (conftest.py): a test that runs past it fails and
the run goes on; one stuck where no Python runs ends the run with every thread's stack."""
import subprocess
import sys
from pathlib import Path

import pytest

HANGING = """
import signal, time
import pytest

@pytest.mark.timeout(1)
def test_sleeps_past_its_limit():
    time.sleep(60)

def test_after_it():
    pass

@pytest.mark.timeout(1)
def test_stuck_where_no_python_runs():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as C code that never returns
    time.sleep(60)
"""


@pytest.mark.timeout(120)
def test_a_hanging_test_fails_at_its_limit_and_a_stuck_one_ends_the_run(tmp_path):
    conftest = Path(__file__).with_name("conftest.py").read_text()
    report_at_once = ("\ndef pytest_runtest_logreport(report):\n"  # the run ends before its summary
                      "    if report.when == 'call':\n"
                      "        print(report.nodeid, report.outcome, report.longreprtext)\n")
    conftest = conftest.replace("STACKS_AFTER_S = 30", "STACKS_AFTER_S = 1")
    (tmp_path / "conftest.py").write_text(conftest + report_at_once)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    timeout(seconds): limit\n")
    (tmp_path / "test_hanging.py").write_text(HANGING)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hanging.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=100)
    out = done.stdout + done.stderr
    assert "test_sleeps_past_its_limit failed" in out and "ran past its 1 s limit" in out, out
    assert "test_after_it passed" in out, out
    assert "Timeout (0:00:02)!" in out and "test_stuck_where_no_python_runs" in out, out
    assert done.returncode != 0
