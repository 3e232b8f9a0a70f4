"""Bad input, tried as a new user would: every entry point ends it with one `error: ...` line that
names the setting, a non-zero exit and no traceback, before any model weights or data are read.
The CLIs run in this process (as `python -m` runs them), so each case costs its config checks only."""
import runpy
import sys
from pathlib import Path

import h5py
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from nn_decomp.config import UsageError

TRAIN = "nn_decomp.train"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run(module: str, args: list[str], capsys) -> tuple[int, str]:
    """`python -m module args` (or `python experiments/<module>/run.py args`) in process: (exit code,
    what it printed to stderr, the exit message included)."""
    argv, sys.argv = sys.argv, [module, *args]
    GlobalHydra.instance().clear()
    try:
        if module.startswith("exp_"):
            runpy.run_path(str(EXPERIMENTS / module / "run.py"), run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        code, message = 0, ""
    except SystemExit as e:
        code, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err + message  # stdout (--help) is dropped


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("One speech, so one document.")
    with h5py.File(tmp_path / "garbage.h5", "w") as f:
        f["x"] = [1, 2, 3]
    (tmp_path / "notes.txt").write_text("not a cache")
    return tmp_path


CASES = [  # (module, args, a fragment the one line must name)
    (TRAIN, ["act=topk", "act.k=0"], "act.k=0"),
    (TRAIN, ["act=topk", "act.k=4096", "arch.n_latents=2048"], "act.k=4096 must be < arch.n_latents=2048"),
    (TRAIN, ["arch=clt", "arch.layers=[2]"], "arch=clt needs >= 2 layers"),
    (TRAIN, ["arch=transcoder", "arch.layers=[1,2]"], "use arch=clt"),
    (TRAIN, ["arch=clt", "arch.layers=[3,1]"], "distinct increasing"),
    (TRAIN, ["arch=crosscoder", "arch.layers=[2]"], "arch=crosscoder needs >= 2 layers"),
    (TRAIN, ["arch=transcoder", "arch.decoder_norm=sum"], "arch.decoder_norm=sum sums per-layer norms"),
    (TRAIN, ["arch=clt", "arch.decoder_norm=l2"], "arch.decoder_norm='l2': choose one of"),
    (TRAIN, ["arch=molt", "arch.molt_ranks=[8,64]"], "largest first"),
    (TRAIN, ["arch=molt", "arch.n_latents=4"], "leaves rank 64 of arch.molt_ranks=[64, 32, 16, 8] no transform"),
    (TRAIN, ["arch=transcoder", "arch.molt_ranks=[8]"], "arch.molt_ranks is arch=molt's"),
    (TRAIN, ["arch.n_latents=0"], "arch.n_latents=0"),
    (TRAIN, ["train.batch_size=0"], "train.batch_size=0"),
    (TRAIN, ["train.n_tokens=10"], "train.n_tokens must be >= train.batch_size"),
    (TRAIN, ["train.log_every=0"], "log_every"),
    (TRAIN, ["train.optimizer.lr=-1"], "train.optimizer.lr=-1"),
    (TRAIN, ["train.decay=exponential"], "train.decay='exponential'"),
    (TRAIN, ["train.resume=maybe"], "train.resume='maybe'"),
    (TRAIN, ["train.dtype=float64"], "train.dtype='float64': use one of"),
    (TRAIN, ["data=synthetic", "data.background=true"], "data.background=true runs an LM in a child process"),
    (TRAIN, ["train.resume=true"], "train without resume first"),
    (TRAIN, ["act=relu", "act.l1_coef=-1"], "act.l1_coef=-1"),
    (TRAIN, ["act=relu", "act.p_end=0"], "act.p_end=0"),
    (TRAIN, ["act=relu", "act.anneal_start=1"], "act.anneal_start=1"),
    (TRAIN, ["act=topk", "act.aux_coef=-1"], "act.aux_coef=-1"),
    (TRAIN, ["act=jumprelu", "act.penalty=l2"], "act.penalty='l2'"),
    (TRAIN, ["act=jumprelu", "act.target_l0=0"], "act.target_l0=0"),
    (TRAIN, ["act=jumprelu", "act.bandwidth=0"], "act.bandwidth"),
    (TRAIN, ["data.eval_fraction=1.5"], "data.eval_fraction=1.5"),
    (TRAIN, ["data.source=text", "data.path=/nonexistent/*.txt"], "data.path='/nonexistent/*.txt' matches no files"),
    (TRAIN, ["data.source=text", "data.path={tmp}/empty.txt"], "empty.txt' is empty: its 1 file(s) hold no text"),
    (TRAIN, ["data.source=text", "data.path={tmp}/one.txt"], "at least 2"),
    (TRAIN, ["data=cache", "data.path=/nonexistent/acts.h5"], "python -m nn_decomp.cache"),
    (TRAIN, ["data=cache", "data.path={tmp}/notes.txt"], "notes.txt"),
    (TRAIN, ["data=cache", "data.path={tmp}/garbage.h5"], "not an nn_decomp activation cache"),
    (TRAIN, ["arch.layers=[99]"], "arch.layers=[99] out of range: smollm2_135m has 30 layers (0..29)"),
    (TRAIN, ["logger.name=tensorboard"], "logger.name='tensorboard'"),
    (TRAIN, ["arch=transcoder", "arch.decoder_tying=per_source"], "use arch=clt"),
    (TRAIN, ["arch.matryoshka=[4096]"], "arch.matryoshka=[4096]"),
    (TRAIN, ["arch=sae", "arch.skip=true"], "arch.skip=True with arch=sae"),
    ("nn_decomp.cache", ["data=cache", "data.path={tmp}/garbage.h5"], "data=cache reads a cache"),
    ("nn_decomp.cache", ["cache.dtype=int8"], "cache.dtype='int8'"),
    ("nn_decomp.cache", ["cache.chunk_rows=0"], "cache.chunk_rows=0"),
    ("nn_decomp.cache", ["cache.shuffle_mib=0"], "cache.shuffle_mib=0: must be positive"),
    ("nn_decomp.evaluate", [], "no checkpoint given"),
    ("nn_decomp.evaluate", ["checkpoint={tmp}"], "is not a checkpoint"),
    ("nn_decomp.evaluate", ["checkpoint={tmp}", "eval.n_tokens=0"], "eval.n_tokens and eval.batch_contexts must be > 0"),
    ("nn_decomp.convert", [], "no checkpoint given"),
    ("nn_decomp.convert", ["checkpoint={tmp}", "estimator=bogus"], "estimator='bogus': choose one of"),
    ("nn_decomp.attribute", ["checkpoint={tmp}", "out={tmp}/graphs", "batch_size=0"], "batch_size=0: must be > 0"),
    ("nn_decomp.saebench", ["checkpoint={tmp}", "evals=[core,spelling]"], "evals=['core', 'spelling']: choose from"),
    ("nn_decomp.export", ["checkpoint={tmp}", "format=saelens", "out={tmp}/out"], "is not a checkpoint"),
    ("nn_decomp.export", ["format=hf_model", "first_n_layers=31", "out={tmp}/out"], "first_n_layers"),
    ("nn_decomp.collect", ["/nonexistent/sweep"], "is not a directory"),
    ("nn_decomp.collect", ["{tmp}", "output=x.csv"], "unknown option"),
    ("exp_002_pareto", ["scale=huge"], "scale=huge: use one of smoke, cpu, cpu_2m, gpu"),
    ("exp_005_ground_truth", ["scale=cpu_2m"], "exp_005_ground_truth has no scale=cpu_2m"),
]
if not torch.cuda.is_available():
    CASES.append((TRAIN, ["model.device=cuda"], "model.device=cuda: this machine has no CUDA device"))


@pytest.mark.parametrize("module, args, fragment", CASES, ids=[" ".join([m.split(".")[-1], *a]) for m, a, _ in CASES])
def test_bad_input_ends_with_one_line_naming_the_fix(module, args, fragment, files, capsys, monkeypatch):
    monkeypatch.chdir(files)  # Hydra's run dirs land here
    code, err = run(module, [a.replace("{tmp}", str(files)) for a in args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.replace("{tmp}", str(files)) in lines[0], err


def test_nn_decomp_debug_shows_the_traceback(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    monkeypatch.setenv("NN_DECOMP_DEBUG", "1")
    code, err = run(TRAIN, ["act=topk", "act.k=0"], capsys)
    assert code == 1 and "Traceback" in err and f"{UsageError.__name__}: act.k=0" in err


@pytest.mark.parametrize("module", [TRAIN, "nn_decomp.cache", "nn_decomp.evaluate", "nn_decomp.convert",
                                    "nn_decomp.export", "nn_decomp.collect", "exp_003_all_layers_patching"])
def test_every_entry_point_answers_help(module, capsys):
    assert run(module, ["--help"], capsys)[0] == 0
