"""benchmarks/gpu_check.sh --dry-run: the GPU check's code paths (CUDA gradients check, timing rows
for every library installed, bf16 autocast) at tiny sizes on CPU, so the script works when a GPU is lent."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_gradients_and_prints_both_tables():
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    checked = re.findall(r"^    \w+ +\w+ +\S+ ok$", out, re.MULTILINE)
    assert "gradients: all ok" in out and len(checked) == 9, out  # 4 activations × (SAE, transcoder) + a CLT
    for dtype in ("fp32", "bf16"):
        assert f"k=4 {dtype}" in out
    table_rows = re.findall(r"^    (ours SAE BatchTopK|saelens SAE TopK) +[\d.]+ ", out, re.MULTILINE)
    assert len(table_rows) == 4, out  # each in the fp32 and the bf16 table
