"""tools/mutation_scores.py: mutmut's result lines become one score per module (a real mutmut run on a tiny project:
tests/e2e/test_tool_scripts.py)."""
import subprocess
import sys

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
