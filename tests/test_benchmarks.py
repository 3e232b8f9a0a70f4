"""Benchmarks' smoke runs. benchmarks/gpu_check.sh --dry-run: the GPU check's code paths (CUDA gradients
check, timing rows for every library installed, bf16 autocast) at tiny sizes on CPU, so the script works
when a GPU is lent. benchmarks/clt_layers.py --quick: the CLT-over-layers table at tiny sizes."""
import json
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


def test_clt_layers_quick_prints_the_table_and_writes_the_json(tmp_path):
    """benchmarks/clt_layers.py --quick: CLT and per-layer transcoder rows at 2 and 3 layers and the tied
    CLT, each in its own process, through the library's init_coder and Trainer."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "clt_layers.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clt_layers.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^(CLT \d|PLT set \d|CLT tied \d) ", done.stdout, re.MULTILINE)
    assert rows == ["CLT 2", "PLT set 2", "CLT 3", "PLT set 3", "CLT tied 3"], done.stdout
    saved = json.loads(out.read_text())
    by_row = {r["row"]: r for r in saved["rows"]}
    # an untied CLT's decoder is the triangle Σ_i F·(L−i)·D; k latents per token and layer
    d, F, k = 64, 128, 4
    clt3 = by_row["CLT 3"]
    assert clt3["n_params"] == F * d * 6 + 3 * F * d + 3 * F + 3 * d and clt3["l0"] == 3 * k
    assert clt3["grads_mb"] == clt3["params_mb"] and clt3["adam_mb"] == 2 * clt3["params_mb"]
    assert by_row["PLT set 3"]["n_params"] == 3 * (2 * F * d + F + d)
    assert {r["n_layers"] for r in saved["ratios"]} == {2, 3} and saved["exponents"]["clt ms"]["fit"] is not None
