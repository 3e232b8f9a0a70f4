"""Typed config schemas, one module per group of conf/, importable without torch so that bad input
fails before any model or data is loaded. Each YAML in conf/<group>/ starts from one of them
(`defaults: [base_x]`, registered in Hydra's ConfigStore on import), so a typo or a wrong type fails
at composition with Hydra's own message; each schema's `__post_init__` checks its own fields.

- `errors`       `UsageError`, `require`: the one-line errors every check raises.
- `arch`         `ArchConfig` (arch:), the arch families, `arch_hooks`, `molt_groups`.
- `act`          the activations' schemas (act:).
- `model`, `logger`, `train`  `ModelConfig`, `LoggerConfig`, `TrainConfig` (+ `check_resume`).
- `data`         `DataConfig`, `SyntheticDataConfig` (data:), `CacheConfig` (cache:).
- `commands`     the entry configs of evaluate, convert, export over one `CommandConfig` base.
- `experiments`  `AnalysisConfig`, `InterpConfig`: the experiment scripts' `analysis:` / `interp:`.
- here           `validate(cfg)`: the checks that need the whole config (k vs n_latents, devices);
                 `check_command(cfg)`: a command's entry config through its schema's checks;
                 `path_safe`, the `${path_safe:…}` resolver of sweep subdir names.
"""
import re
from dataclasses import fields, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nn_decomp.config.act import BatchTopKConfig, JumpReLUConfig, ReLUConfig, TopKConfig
from nn_decomp.config.arch import ArchConfig
from nn_decomp.config.commands import AttributeConfig, ConvertConfig, EvaluateConfig, ExportConfig, SaebenchConfig
from nn_decomp.config.data import CacheConfig, DataConfig, SyntheticDataConfig
from nn_decomp.config.errors import UsageError, require
from nn_decomp.config.logger import LoggerConfig
from nn_decomp.config.model import ModelConfig
from nn_decomp.config.train import TrainConfig

__all__ = ["UsageError", "require", "validate", "check_command"]  # what every module imports from here


def validate(cfg: DictConfig) -> None:
    """Run every schema's checks on the composed config, plus the cross-group ones, before any
    model is loaded."""
    for group in ("arch", "act", "model", "data", "train", "logger", "cache"):
        if group in cfg:  # configs saved before the cache group existed lack it
            OmegaConf.to_object(cfg[group])
    k = cfg.act.get("k")
    require(k is None or k < cfg.arch.n_latents,
            f"act.k={k} must be < arch.n_latents={cfg.arch.n_latents}: lower act.k or raise arch.n_latents")
    tp = cfg.train.get("tensor_parallel", 1)
    if tp > 1:
        n = cfg.arch.n_latents
        require(n % tp == 0 and (k is None or k < n // tp),
                f"train.tensor_parallel={tp}: arch.n_latents={n} must split into {tp} equal shards"
                + (f" of more than act.k={k} latents each" if k else ""))
        require(cfg.arch.name != "molt" and not cfg.arch.get("matryoshka"),
                f"train.tensor_parallel={tp}: not available for arch=molt or arch.matryoshka; use 1")
    if cfg.data.source == "cache":
        require(cfg.train.batch_size % cfg.data.streams == 0,
                f"train.batch_size={cfg.train.batch_size} must be a multiple of data.streams={cfg.data.streams}")
    lr = OmegaConf.select(cfg, "train.optimizer.lr", default=None)
    require(lr is None or lr > 0, f"train.optimizer.lr={lr}: must be positive")
    import torch  # here, not at the top: the schemas import without torch (tests/test_configs.py checks it)

    for key in ("model.device", "train.device"):
        device = str(OmegaConf.select(cfg, key, default="auto"))
        require(not device.startswith("cuda") or torch.cuda.is_available(),
                f"{key}={device}: this machine has no CUDA device; use {key}=cpu or auto")


def check_command(cfg: DictConfig) -> None:
    """Run the `__post_init__` checks of a command's schema (and of its nested ones, e.g. `eval:`) on
    the values the user gave: Hydra's composition only checks their types. Interpolations stay
    unresolved: `${hydra:...}` in paths has no value outside a running app (tests, experiments), and
    OmegaConf's own instantiation resolves them all."""
    def instantiate(schema: type, values: dict) -> object:
        return schema(**{f.name: instantiate(f.type, values[f.name]) if is_dataclass(f.type) else values[f.name]
                         for f in fields(schema) if f.name in values})

    instantiate(OmegaConf.get_type(cfg), OmegaConf.to_container(cfg, resolve=False))


def path_safe(name: str) -> str:
    """`name` as one path component that Hydra's override grammar reads unquoted, so that sweep
    subdirs go into `checkpoints=[A,B]` as they are: brackets, braces and quotes dropped, every other
    character but letters, digits and `_ . + -` made `_`. Subdirs are
    `${path_safe:${hydra.job.override_dirname}}` with kv_sep `-` and item_sep `+` (conf/hydra/):
    `act.k=16 arch.layers=[0,1]` → `act.k-16+arch.layers-0_1`."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", re.sub(r"[\[\]{}'\"]", "", name))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="arch", name="base_arch", node=ArchConfig)
    cs.store(group="act", name="base_relu", node=ReLUConfig)
    cs.store(group="act", name="base_topk", node=TopKConfig)
    cs.store(group="act", name="base_batchtopk", node=BatchTopKConfig)
    cs.store(group="act", name="base_jumprelu", node=JumpReLUConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="data", name="base_synthetic_data", node=SyntheticDataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    cs.store(group="cache", name="base_cache", node=CacheConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)  # entry configs: conf/{evaluate,convert,export}.yaml
    cs.store(name="base_convert", node=ConvertConfig)
    cs.store(name="base_export", node=ExportConfig)
    cs.store(name="base_attribute", node=AttributeConfig)
    cs.store(name="base_saebench", node=SaebenchConfig)
    if not OmegaConf.has_resolver("join"):  # `${join:${arch.layers}}` -> "0-1-2" in file names
        OmegaConf.register_new_resolver("join", lambda items, sep="-": sep.join(str(i) for i in items))
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)


register_configs()
