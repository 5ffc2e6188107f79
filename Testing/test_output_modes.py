"""Outputs get the permissions a plain write would give (mkstemp/mkdtemp alone make them private)."""
from __future__ import annotations

import os
import stat

import pytest

from PTQLogic.core.fileio import atomic_path, atomic_write_text, default_mode, staging_dir


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_output_and_staging_folder_follow_the_umask(tmp_path, umask_027):
    assert default_mode(directory=False) == 0o640 and default_mode(directory=True) == 0o750
    atomic_write_text(tmp_path / "labels.json", "{}")
    assert _mode(tmp_path / "labels.json") == 0o640  # readable by the group, as `open(..., "w")` would give
    with atomic_path(tmp_path / "ct.nii.gz") as tmp:
        assert _mode(tmp) == 0o640  # writers that keep the file's mode see the final one already
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "ct.nii.gz") == 0o640
    folder = staging_dir(tmp_path / "out" / "unet-int8")
    assert folder.parent == tmp_path / "out" and folder.name.startswith(".unet-int8.partial-")
    assert _mode(folder) == 0o750
