"""Every config option composes, validates and instantiates; bad values fail at composition or in
`validate`, before any model is loaded."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from nn_decomp.runtime.checkpoint import build_coder
from nn_decomp.config import validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_schemas_import_without_torch():
    """The schemas load no torch, so bad input fails at composition before the heavy imports
    (validate imports torch inside, for its CUDA check)."""
    code = "import sys, nn_decomp.config; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("arch", options("arch"))
@pytest.mark.parametrize("act", options("act"))
def test_every_arch_and_act_composes_and_builds(arch, act):
    cfg = compose_cfg(f"arch={arch}", f"act={act}", "arch.n_latents=64")
    validate(cfg)
    coder = build_coder(cfg, 16, 16)
    assert coder.n_layers == len(cfg.arch.layers)
    assert (coder.W_skip is not None) == (arch == "skip_transcoder")
    assert coder.cross_layer == (arch == "clt")
    assert type(coder.activation).__name__.lower() == act


@pytest.mark.parametrize("group", ["model", "data", "logger"])
def test_every_option_of_other_groups_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"] + (["data.path=some/dataset"] if option == "hf" else [])
        validate(compose_cfg(*overrides))


def test_slurm_launcher_preset_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize("override", ["arch=mlp", "act=gelu", "model=llama_70b"])
def test_unknown_option_lists_the_choices(override):
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_cfg(override)


def test_typo_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="n_latent"):
        compose_cfg("arch.n_latent=10")
    with pytest.raises((ConfigCompositionException, ValidationError), match="n_latents"):
        compose_cfg("arch.n_latents=many")


@pytest.mark.parametrize("overrides, message", [
    (["act=topk", "act.k=64", "arch.n_latents=64"], "act.k=64 must be < arch.n_latents"),
    (["arch=clt", "arch.layers=[3]"], "arch=clt needs >= 2 layers"),
    (["arch=transcoder", "arch.layers=[1,2]"], "use arch=clt"),
    (["act=jumprelu", "act.penalty=l1"], "act.penalty"),
    (["train.decay=step"], "train.decay"),
    (["data=hf"], "data.path"),
])
def test_bad_values_fail_before_compute_with_the_fix(overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(cfg)
