"""util.errors: one line for every expected failure, with its exit code, including an error raised inside a
data-loader worker and Ctrl-C."""
import pytest
import torch

from util.errors import RunError, describe, run_cli


class Unreadable(RunError):
    pass


class FailsAt(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == 5:
            raise Unreadable("cannot read image 5.png: truncated")
        return index


def test_an_error_in_a_loader_worker_is_its_own_message_and_the_worker():
    batches = iter(torch.utils.data.DataLoader(FailsAt(), batch_size=2, num_workers=2))
    try:
        with pytest.raises(Unreadable) as raised:
            list(batches)
        assert "Original Traceback" in str(raised.value)
        assert describe(raised.value) == "cannot read image 5.png: truncated (in DataLoader worker process 0)"
    finally:
        batches._shutdown_workers()  # now, not when the traceback is collected (seconds later)


def run_and_exit(failure, capsys):
    def run():
        raise failure

    with pytest.raises(SystemExit) as exited:
        run_cli("tool.py", run)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("failure, code, line", [
    (KeyboardInterrupt(), 130, "tool.py: interrupted (SIGINT); every file written so far is complete\n"),
    (ValueError("--x 3: must be >= 4"), 2, "tool.py: error: --x 3: must be >= 4\n"),
    (Unreadable("a.png: truncated"), 1, "tool.py: error: a.png: truncated\n"),
    (OSError(28, "No space left on device", "ckpt.pth"), 1, "tool.py: error: no space left on device: ckpt.pth\n"),
])
def test_each_expected_failure_is_one_line_with_its_exit_code(capsys, failure, code, line):
    assert run_and_exit(failure, capsys) == (code, line)


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        run_cli("tool.py", lambda: {}["missing"])
