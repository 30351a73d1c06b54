"""tools/mutation_scores.py: mutmut's result lines become one score per module, and mutmut itself, run on a tiny
project, writes the lines the tool reads."""
import os
import subprocess
import sys
import textwrap

from tests.support import REPO_ROOT
from tools.mutation_scores import module_counts, score_table

RESULTS = """\
    util.eval.layout.xǁEvaluationǁidentity__mutmut_1: killed
    util.eval.layout.xǁEvaluationǁidentity__mutmut_2: survived
    util.eval.layout.x_image_key__mutmut_4: killed
    util.eval.layout.x_image_key__mutmut_5: timeout
    models.flow.x_flow_loss__mutmut_1: no tests
    models.flow.x_flow_loss__mutmut_2: killed
Running mutation testing
"""


def test_scores_count_survivors_and_unreached_mutants_against_the_module():
    counts = module_counts(RESULTS.splitlines())
    assert counts["util.eval.layout"] == {"killed": 2, "survived": 1, "timeout": 1}
    assert counts["models.flow"] == {"no tests": 1, "killed": 1}
    assert score_table(counts).splitlines()[2:] == ["| `models.flow` | 2 | 1 | 0 | 1 | 50 % |",
                                                    "| `util.eval.layout` | 4 | 3 | 1 | 0 | 75 % |"]


def test_no_results_is_an_error():
    done = subprocess.run([sys.executable, "tools/mutation_scores.py"], input="", capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stderr == ("mutation_scores.py: error: no mutmut results on stdin (run "
                                                    "`mutmut run` first)\n")


def test_the_scores_of_a_real_mutmut_run(tmp_path):
    """`is_positive` has a test that kills `a >= 0` and misses `a > 1`; `double` has no test."""
    (tmp_path / "arith.py").write_text(textwrap.dedent("""\
        def is_positive(a):
            return a > 0


        def double(a):
            return a * 2
        """))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_arith.py").write_text(
        "from arith import is_positive\n\n\ndef test_is_positive():\n    assert not is_positive(0)\n")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""\
        [tool.mutmut]
        source_paths = ["arith.py"]
        pytest_add_cli_args_test_selection = ["tests"]
        pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
        """))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MUTANT", "PYTEST"))}
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", "1"], cwd=tmp_path, env=env, check=True, capture_output=True)
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=tmp_path, env=env, check=True,
                             capture_output=True, text=True).stdout
    table = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "mutation_scores.py")], input=results,
                           capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[2:] == ["| `arith` | 4 | 1 | 1 | 2 | 25 % |"], results
