"""The bridge to a foreign tool's own Python: a missing environment is one line naming the command
that creates it; a request goes in as JSON + safetensors and the result comes back; a failed worker
shows its stderr, another protocol version is refused; workers import nothing of ours. Our own
Python stands in for the foreign one (a worker here uses numpy's safetensors reader, not ours)."""
import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nn_decomp.config import UsageError
from nn_decomp.interop.bridge import REPO, WORKERS, Tool, WorkerError, find_python, run_worker
from nn_decomp.interop.circuit_tracer import CIRCUIT_TRACER
from nn_decomp.interop.workers import protocol

TOOL = Tool("stand-in")


def nn_decomp_imports(path: Path) -> list[str]:
    """The imports of the file at `path` that would need nn_decomp installed (relative ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "nn_decomp"]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "nn_decomp"):
            found.append("." * node.level + (node.module or ""))
    return found


def test_workers_import_nothing_of_ours():
    workers = sorted(WORKERS.glob("*.py"))
    assert WORKERS / "circuit_tracer_check.py" in workers
    assert {w.name: nn_decomp_imports(w) for w in workers} == {w.name: [] for w in workers}


def test_the_import_check_sees_every_form(tmp_path):
    (tmp_path / "w.py").write_text("import nn_decomp.core\nfrom nn_decomp import export\nfrom . import x\n"
                                   "def f():\n    import nn_decomp\nimport nn_decomp_other\n")
    assert nn_decomp_imports(tmp_path / "w.py") == ["nn_decomp.core", "nn_decomp", ".", "nn_decomp"]


def test_circuit_tracer_environment_is_found_where_documented(monkeypatch):
    assert CIRCUIT_TRACER.env_var == "NN_DECOMP_CIRCUIT_TRACER_PYTHON"
    assert CIRCUIT_TRACER.venv_python == REPO / ".venv-circuit-tracer" / "bin" / "python"
    assert CIRCUIT_TRACER.setup_command == "bash setup_env.sh --with circuit-tracer"
    assert f"[{CIRCUIT_TRACER.name}]=" in (REPO / "setup_env.sh").read_text()  # its pins, for --with
    monkeypatch.setenv(CIRCUIT_TRACER.env_var, Path(sys.executable).name)  # a name on PATH works too
    assert find_python(CIRCUIT_TRACER) == Path(shutil.which(Path(sys.executable).name))


def test_missing_environment_is_one_usage_error_naming_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.delenv(TOOL.env_var, raising=False)
    with pytest.raises(UsageError, match=r"stand-in runs in its own Python and there is none: create it with "
                                         r"`bash setup_env.sh --with stand-in` \(or set NN_DECOMP_STAND_IN_PYTHON"):
        run_worker(TOOL, tmp_path / "never_run.py", {})
    monkeypatch.setenv(TOOL.env_var, str(tmp_path / "no_python"))
    with pytest.raises(UsageError, match="NN_DECOMP_STAND_IN_PYTHON=.*no_python is not an executable.*--with stand-in"):
        run_worker(TOOL, tmp_path / "never_run.py", {})


def worker(tmp_path, source: str) -> Path:
    """A worker script with protocol.py beside it, as in workers/; our Python stands in for the tool's."""
    shutil.copy(WORKERS / "protocol.py", tmp_path)
    (tmp_path / "worker.py").write_text(source)
    return tmp_path / "worker.py"


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setenv(TOOL.env_var, sys.executable)


def test_request_tensors_and_result_make_the_round_trip(tmp_path, stand_in):
    script = worker(tmp_path, "from safetensors.numpy import load_file\nfrom protocol import serve\n"
                              "serve(lambda args, files: {'sum': float(load_file(files['x'])['v'].sum()) * args['scale'],"
                              " 'names': sorted(files)})\n")
    x = torch.arange(6.0).reshape(2, 3).T  # not contiguous: the bridge writes it anyway
    assert run_worker(TOOL, script, {"scale": 2}, {"x": {"v": x}, "y": {"w": torch.ones(1)}}) == \
        {"sum": 30.0, "names": ["x", "y"]}


def test_failed_worker_raises_with_its_stderr_tail(tmp_path, stand_in):
    script = worker(tmp_path, "import sys\nprint('noise ' * 5000, file=sys.stderr)\nraise ValueError('the cause')\n")
    with pytest.raises(WorkerError, match=r"stand-in worker worker.py failed \(exit 1(.|\n)*ValueError: the cause") as e:
        run_worker(TOOL, script, {})
    assert len(str(e.value)) < 4500


def test_response_in_another_protocol_version_is_refused(tmp_path, stand_in):
    script = worker(tmp_path, "import json, pathlib, sys\npathlib.Path(sys.argv[1], 'response.json').write_text("
                              "json.dumps({'protocol': 999, 'result': {}}))\n")
    with pytest.raises(WorkerError, match=f"answered in protocol 999, the bridge speaks {protocol.PROTOCOL}"):
        run_worker(TOOL, script, {})


def test_worker_refuses_a_request_in_another_protocol_version(tmp_path, monkeypatch):
    (tmp_path / protocol.REQUEST).write_text(json.dumps({"protocol": 0, "worker": "w", "args": {}, "tensors": {}}))
    monkeypatch.setattr(sys, "argv", ["w.py", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"the request speaks protocol 0, this worker {protocol.PROTOCOL}"):
        protocol.serve(lambda args, files: {})
    assert not (tmp_path / protocol.RESPONSE).exists()
