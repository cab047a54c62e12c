"""Atomic writes give the mode a plain open() would under the umask, and still replace atomically."""
from __future__ import annotations

import subprocess
import sys

import pytest

# Run in a child so this process's umask stays as it was; the umask is read when atomic is imported.
WRITE_UNDER_UMASK = """
import os, stat, sys
os.umask(int(sys.argv[2], 8))
from puyu.launcher.atomic import atomic_write_bytes, atomic_write_text
root = sys.argv[1]
atomic_write_text(os.path.join(root, "new.txt"), "new")
open(os.path.join(root, "old.bin"), "wb").close()
atomic_write_bytes(os.path.join(root, "old.bin"), b"replaced")
print(" ".join(oct(stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)) for n in ("new.txt", "old.bin")))
"""


@pytest.mark.parametrize("umask,mode", [("022", "0o644"), ("027", "0o640")])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    out = subprocess.run([sys.executable, "-c", WRITE_UNDER_UMASK, str(tmp_path), umask],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [mode, mode]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.bin"]  # no temp file left beside them
    assert (tmp_path / "old.bin").read_bytes() == b"replaced"
