"""The preloading launcher of the end-to-end tests (tests/support/preloaded.py) runs a script as `python <script>`
would."""
import json
import signal
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, preloaded
from tests.support.runs import ENV

SCRIPT = """
import json, os, sys, time
import numpy as np
mode = sys.argv[1]
if mode == "report":
    print(json.dumps({"name": __name__, "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                      "variable": os.environ.get("PRELOADED_PROBE"), "draw": int(np.random.randint(1 << 30))}))
elif mode == "exit":
    print("to stderr", file=sys.stderr)
    sys.exit(3)
elif mode == "raise":
    raise KeyError("boom")
elif mode == "wait":
    print("waiting", flush=True)
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("preloaded") / "probe.py"
    path.write_text(SCRIPT)
    return str(path)


def test_argv_name_folder_and_environment_are_a_real_interpreters_and_numpy_is_seeded_afresh(script):
    env = {**ENV, "PRELOADED_PROBE": "here"}
    argv = [script, "report", "x"]
    reports = [json.loads(preloaded.run(argv, env, timeout=60).stdout) for _ in range(2)]
    real = json.loads(subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                                     text=True, check=True).stdout)
    draws = {report.pop("draw") for report in (*reports, real)}
    assert reports[0] == reports[1] == real
    assert real["variable"] == "here" and real["name"] == "__main__"
    assert len(draws) == 3


def test_exit_code_stderr_and_uncaught_exception(script):
    exited = preloaded.run([script, "exit"], ENV, timeout=60)
    assert (exited.returncode, exited.stdout, exited.stderr) == (3, "", "to stderr\n")
    raised = preloaded.run([script, "raise"], ENV, timeout=60)
    assert raised.returncode == 1 and "Traceback" in raised.stderr and "KeyError: 'boom'" in raised.stderr


def test_a_started_script_streams_its_output_and_can_be_killed(script):
    process = preloaded.start([script, "wait"], ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout.readline() == "waiting\n"
    assert process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert process.stdout.read() == ""


def test_a_different_openmp_setting_is_refused(script):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='2' differs"):
        preloaded.run([script, "report"], {**ENV, "OMP_NUM_THREADS": "2"}, timeout=60)


def test_the_server_ends_with_the_tests_that_started_it():
    server = preloaded._Server(ENV)
    server.process.stdin.close()  # what the tests' exit, or their death, does
    assert server.process.wait(timeout=30) == 0
