"""Runs a foreign tool whose pins conflict with ours (circuit-tracer wants transformers <= 4.57.3) in
its own Python, talking through files instead of imports:
- the Python: $NN_DECOMP_<TOOL>_PYTHON (a path, or a name on PATH), else the repo's .venv-<tool>,
  which `bash setup_env.sh --with <tool>` creates; `require_python` turns a missing one into one
  UsageError line naming that command, so a command calls it before loading anything heavy;
- `run_worker`: a fresh temp dir with request.json (args) and the tensors as safetensors files beside
  it, `PYTHON -E workers/<worker>.py DIR` as a subprocess, then response.json, whose protocol version
  must be ours (workers/protocol.py holds the fields and the version, for both sides). A failed worker
  raises WorkerError with the tail of its stderr.
"""
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from nn_decomp.config import UsageError
from nn_decomp.interop.workers.protocol import PROTOCOL, REQUEST, RESPONSE

REPO = Path(__file__).resolve().parents[3]
WORKERS = Path(__file__).parent / "workers"
STDERR_TAIL = 4000  # characters of a failed worker's stderr in its WorkerError: the traceback's end


class WorkerError(RuntimeError):
    """A worker failed, or answered in another protocol version."""


@dataclass(frozen=True)
class Tool:
    """A foreign tool with its own Python; `name` as in `bash setup_env.sh --with NAME`."""

    name: str

    @property
    def env_var(self) -> str:
        return f"NN_DECOMP_{self.name.upper().replace('-', '_')}_PYTHON"

    @property
    def venv_python(self) -> Path:
        return REPO / f".venv-{self.name}" / "bin" / "python"

    @property
    def setup_command(self) -> str:
        return f"bash setup_env.sh --with {self.name}"


def find_python(tool: Tool) -> Path | None:
    """The tool's Python as $NN_DECOMP_<TOOL>_PYTHON names it, else its .venv-<tool>; None if neither."""
    named = os.environ.get(tool.env_var)
    if named:
        return Path(shutil.which(named) or named)
    return tool.venv_python if tool.venv_python.exists() else None


def require_python(tool: Tool) -> Path:
    """find_python, or one UsageError naming the command that creates the environment."""
    python = find_python(tool)
    if python is None:
        raise UsageError(f"{tool.name} runs in its own Python and there is none: create it with "
                         f"`{tool.setup_command}` (or set {tool.env_var} to a Python that has {tool.name})")
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"{tool.env_var}={python} is not an executable: point it at a Python that has "
                         f"{tool.name}, or unset it and create one with `{tool.setup_command}`")
    return python


def run_worker(tool: Tool, worker: Path, args: dict, tensors: dict[str, dict[str, Tensor]] | None = None,
               timeout: float | None = None) -> dict:
    """Run the script `worker` in `tool`'s Python on `args` (JSON) and `tensors` (name → tensors, the
    worker gets one safetensors file per name); returns its result. The worker's stdout passes through."""
    python = require_python(tool)
    with tempfile.TemporaryDirectory(prefix=f"{worker.stem}_") as tmp:
        request_dir = Path(tmp)
        write_request(request_dir, worker.stem, args, tensors or {})
        # -E: the worker sees only its own environment's packages, not ours through PYTHONPATH
        done = subprocess.run([str(python), "-E", str(worker), str(request_dir)], stderr=subprocess.PIPE, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise WorkerError(f"{tool.name} worker {worker.name} failed (exit {done.returncode}, {python}); "
                              f"its stderr ends:\n{done.stderr[-STDERR_TAIL:]}")
        return read_response(request_dir / RESPONSE, worker)


def write_request(request_dir: Path, worker: str, args: dict, tensors: dict[str, dict[str, Tensor]]) -> None:
    files = {name: f"{name}.safetensors" for name in tensors}
    for name, content in tensors.items():
        save_file({k: v.contiguous() for k, v in content.items()}, request_dir / files[name])
    request = {"protocol": PROTOCOL, "worker": worker, "args": args, "tensors": files}
    (request_dir / REQUEST).write_text(json.dumps(request))


def read_response(path: Path, worker: Path) -> dict:
    response = json.loads(path.read_text())
    if response.get("protocol") != PROTOCOL:
        raise WorkerError(f"{worker} answered in protocol {response.get('protocol')}, the bridge speaks {PROTOCOL}: "
                          "the two come from different versions of nn_decomp")
    return response["result"]
