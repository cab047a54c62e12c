"""tests/cluster/smoke_test.sh fails, naming the check, when a check fails (it used to print "smoke test
passed" whatever happened: ``cmd && ok`` lines are exempt from ``set -e``)."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent / "cluster" / "smoke_test.sh"


def test_a_failed_check_ends_the_smoke_test_with_its_name(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    # a cluster whose only partition is down: the first check (sinfo) must fail the script
    (fake / "sinfo").write_text("#!/bin/sh\necho 'debug* down 3 idle'\n")
    (fake / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch-ran\necho 42\n")  # must not be reached
    for tool in ("sinfo", "sbatch"):
        (fake / tool).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL sinfo" in proc.stderr and "smoke test passed" not in proc.stdout
    assert not (tmp_path / "sbatch-ran").exists()  # the script stopped at the failed check
