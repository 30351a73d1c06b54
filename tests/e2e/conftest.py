"""Fixtures shared by the end-to-end modules."""
import pytest

from tests.support.runs import write_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small class-per-folder image set (`write_image_folder`), one per test module."""
    return write_image_folder(tmp_path_factory.mktemp("data"))
