"""The house's rules, read from the code itself: models/ holds the math alone, run settings stop at the
orchestrators, the project's modules import each other without a cycle, no dependency outside the allowed, and no
file cites a document outside the repository."""
import ast
import re
import subprocess

import pytest

from tests.support import REPO_ROOT

ROOMS = ("models", "util", "digits", "tools")
TOP_LEVEL = ("main", "main_cache", "engine_transdiff", "quickstart", "demo_page")


def project_modules() -> dict:
    """Every module of the project (tests and benchmarks aside): dotted name -> path."""
    modules = {name: REPO_ROOT / f"{name}.py" for name in TOP_LEVEL}
    for room in ROOMS:
        for path in (REPO_ROOT / room).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = project_modules()


def imports_of(path) -> set:
    """The modules `path` imports, at its top or inside functions: dotted names as written."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def project_imports(path) -> set:
    return {name for name in imports_of(path) if name in MODULES}


def test_models_hold_the_math_alone():
    """No execution machinery under models/: no custom ops, no C, no ctypes or subprocess, nothing from util/."""
    assert not list((REPO_ROOT / "models").rglob("*.c"))
    for path in (REPO_ROOT / "models").rglob("*.py"):
        roots = {name.split(".")[0] for name in imports_of(path)}
        assert not roots & {"ctypes", "subprocess", "util"}, path
        assert "torch.library" not in path.read_text(), path


def test_no_c_sources_anywhere():
    assert not [p for p in REPO_ROOT.rglob("*.c") if ".venv" not in p.parts]


def test_run_settings_stop_at_the_orchestrators():
    """No function under util/, digits/ or models/ takes the whole namespace, but the settings step's own."""
    allowed = {("util/settings.py", "resolve_args"), ("util/settings.py", "resolve_device")}
    for room in ("util", "digits", "models"):
        for path in (REPO_ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
                    where = (path.relative_to(REPO_ROOT).as_posix(), node.name)
                    assert "args" not in names or where in allowed, where


def test_the_import_graph_of_the_project_has_no_cycle():
    graph = {name: {target for target in project_imports(path) if target != name} for name, path in MODULES.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("room", ["models", "util"])
def test_lower_rooms_do_not_import_the_orchestrators(room):
    for path in (REPO_ROOT / room).rglob("*.py"):
        assert not {name.split(".")[0] for name in imports_of(path)} & set(TOP_LEVEL), path


def test_no_forbidden_dependencies():
    """diffusers, transformers and opencv are not dependencies: their few helpers are our own lines."""
    sources = [p for p in REPO_ROOT.rglob("*.py") if ".venv" not in p.parts] + [REPO_ROOT / "demo.ipynb"]
    for path in sources:
        for line in path.read_text().splitlines():
            words = line.replace('"', " ").strip().split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in {"diffusers", "transformers", "cv2"}, f"{path}: {line}"


def test_the_readme_is_a_first_screen():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme):
        assert (REPO_ROOT / page).is_file(), page


def entry_points() -> dict:
    """Every project module run as a script: dotted name -> the body of its `if __name__ == "__main__":`."""
    found = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and getattr(node.test.left, "id", None) == "__name__"):
                found[name] = node.body
    return found


def test_every_script_reports_an_expected_failure_in_one_line():
    """Each entry point runs through `util.errors.run_cli`: one line and an exit code, never a traceback."""
    scripts = entry_points()
    assert {"main", "main_cache", "quickstart", "tools.make_fid_stats", "tools.download"} <= set(scripts)
    for name, body in scripts.items():
        calls = {getattr(node.func, "id", None) for statement in body for node in ast.walk(statement)
                 if isinstance(node, ast.Call)}
        assert "run_cli" in calls or "cli" in calls, name


# Documents that live beside the repository, not in it (the project's working notes, its specification, its house
# style): a tracked file that cites one points its reader at nothing. Written so that this file does not match.
OUTSIDE_REFERENCES = re.compile(r"\.\./shared|shared[/]notes|(?<![\w-])notes[/]|SPEC\.md|STYLE\.md|DEVELOPERS\.md|"
                                r"paper\sdigest")


def tracked_text_files() -> list:
    """The repository's tracked files that are text (`git ls-files`)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({error})")
    files = []
    for name in filter(None, listed.decode().split("\0")):
        try:
            files.append((name, (REPO_ROOT / name).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):  # binary, or deleted in the work tree
            continue
    return files


@pytest.mark.parametrize("head,tail", [  # each example split in two, so that this file does not match
    ("see ../sha", "red/digits.md"), ("(shared/no", "tes/digits-feasibility.md)"), ("see no", "tes/digits.md"),
    ("SPEC.", "md §2"), ("the house STYLE.", "md"), ("DEVELOPERS.", "md"), ("(paper dig", "est §4)")])
def test_a_reference_outside_the_repository_is_recognised(head, tail):
    assert OUTSIDE_REFERENCES.search(head + tail)


@pytest.mark.parametrize("line", ["docs/training.md", "footnotes/a.md", "release notes", "tests/golden/README.md"])
def test_references_inside_the_repository_are_not_flagged(line):
    assert not OUTSIDE_REFERENCES.search(line)


def test_no_tracked_file_cites_a_document_outside_the_repository():
    files = tracked_text_files()
    assert any(name == "README.md" for name, _ in files)
    cited = [f"{name}:{number}: {line.strip()}" for name, text in files
             for number, line in enumerate(text.splitlines(), start=1) if OUTSIDE_REFERENCES.search(line)]
    assert not cited, "cite in-repository files instead:\n" + "\n".join(cited)
