"""`hydra/launcher=shared_stream`: the jobs of a sweep that read the same activations (model, data,
hooks, batch size, seed, token budget: `runtime.training.stream_key`) train together in this one
process, from one activation stream: the LM runs once per batch for all of them (`train_together`). Each job
still gets its own run dir, .hydra/ configs, checkpoint, metrics and status.json, the same init and
batches it would get alone, so `collect`, `evaluate` and the experiments see no difference. Jobs with
different streams run one group after another. For `python -m nn_decomp.train` only.

A Hydra launcher must live in the `hydra_plugins` namespace package; this one is a thin adapter:
what a job's setup needs from Hydra (its output dir, saved configs, callbacks) is what
hydra.core.utils.run_job does, here split around one shared training call. Hydra imports every plugin
whenever any command starts: the training library (torch) is imported inside the launch methods.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class SharedStreamLauncherConf:
    _target_: str = "hydra_plugins.nn_decomp_launcher.shared_stream.SharedStreamLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="base_shared_stream", node=SharedStreamLauncherConf,
                             provider="nn_decomp")


@dataclass
class Job:
    config: DictConfig  # with hydra: what callbacks and the saved hydra.yaml see
    task_cfg: DictConfig  # the run config, resolved
    ret: JobReturn


class SharedStreamLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nn_decomp.runtime.training import stream_key

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self.prepare(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(stream_key(job.task_cfg), []).append(job)
        log.info(f"Launching {len(jobs)} jobs in {len(groups)} shared stream(s)")
        for group in groups.values():
            self.run_group(group)
        return [job.ret for job in jobs]

    def prepare(self, idx: int, overrides: Sequence[str]) -> Job:
        """The job's config with its output dir, saved to .hydra/ as a lone job's is."""
        from nn_decomp.runtime.training import resolved

        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = idx
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the sweep subdir and the run config
        output_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(output_dir.absolute())
        HydraConfig.instance().set_config(config)
        output_dir.mkdir(parents=True, exist_ok=True)
        task_cfg = config.copy()
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(overrides=list(config.hydra.overrides.task), cfg=task_cfg, hydra_cfg=config.copy(),
                        working_dir=str(Path.cwd()), task_name=config.hydra.job.name)
        if config.hydra.output_subdir is not None:
            hydra_output = output_dir / str(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(config, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        return Job(config, resolved(task_cfg, output_dir), ret)

    def run_group(self, group: list[Job]) -> None:
        """Start every job (callbacks: status.json 'running'), train them together, end each."""
        from nn_decomp.runtime.jobs import end_preempted
        from nn_decomp.runtime.signals import Preempted
        from nn_decomp.runtime.training import train_together

        callbacks = self.hydra_context.callbacks
        for job in group:
            HydraConfig.instance().set_config(job.config)
            callbacks.on_job_start(config=job.config, task_function=self.task_function)
        try:
            results = train_together([j.task_cfg for j in group], [Path(j.config.hydra.runtime.output_dir)
                                                                    for j in group])
        except Preempted as stop:  # every run checkpointed: the sweep ends here, to be resumed
            end_preempted(stop, [Path(j.config.hydra.runtime.output_dir) for j in group])
        except Exception as error:  # before any run began (setup, a bad config): every job of the group
            results = [error] * len(group)
        for job, result in zip(group, results):
            job.ret.status = JobStatus.FAILED if isinstance(result, Exception) else JobStatus.COMPLETED
            job.ret.return_value = result
            HydraConfig.instance().set_config(job.config)
            callbacks.on_job_end(config=job.config, job_return=job.ret)
