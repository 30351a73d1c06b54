"""The commands a documentation page shows, as the docs test reads them (tests/unit/project/test_docs_commands.py)
and as the end-to-end tests that run a page's recipe take them."""
import re

from tests.support import REPO_ROOT


def page_commands(page: str) -> list[str]:
    """The commands of a page: each line of its ```bash blocks (continuations joined, comments dropped, `&&`
    split), and each inline code span that starts with python, bash or torchrun."""
    text = (REPO_ROOT / page).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in
                 re.findall(r"`((?:python3?|bash|torchrun|\.venv/bin/python)\s[^`]*)`", prose)]
    return commands
