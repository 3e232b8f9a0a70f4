"""Resume: whether a run continues from its checkpoint, and the checks before it does. Rank 0 reads
the files (`prepare_resume`); a crashed checkpoint swap is undone, a damaged newest checkpoint is
replaced by `checkpoint.prev/` (with a warning) or refused in one line naming the file, and a finished
run or a config that does not fit the trainer state is refused before the LM loads.

- `resolve_resume(resume, trainer_state)`: `train.resume=auto` resumes when the run dir already holds
  a trainer state (a requeued SLURM job, a re-run sweep); true: it must exist; false: never.
- `finished_run`: with `auto`, a run that reached its last step returns its metrics instead of
  training again (one stopped early by train.max_steps continues).
"""
import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nn_decomp.config import UsageError, require
from nn_decomp.config.train import check_resume
from nn_decomp.runtime import distributed
from nn_decomp.runtime.checkpoint import CHECKPOINT_FILES, METADATA, TRAINER_STATE, DamagedCheckpoint, read_config, verify
from nn_decomp.runtime.distributed import DistInfo
from nn_decomp.runtime.files import previous, recover_dir
from nn_decomp.runtime.sweep_table import flatten

log = logging.getLogger(__name__)


def resolve_resume(resume: bool | str, trainer_state: Path) -> bool:
    """train.resume → whether to load `trainer_state`. true: it must exist; auto: when it exists
    (a requeued SLURM job, a re-run sweep); false: never."""
    check_resume(resume)
    if resume == "auto":
        return Path(trainer_state).exists()
    require(not resume or Path(trainer_state).exists(),
            f"train.resume=true but {trainer_state} does not exist: train without resume first")
    return bool(resume)


def finished_run(resume: bool | str, run_dir: Path, last_step: int) -> dict | None:
    """With train.resume=auto, a run that already finished (`reached_end`; a re-run sweep): its
    metrics, to return instead of training again. None otherwise."""
    metrics = Path(run_dir) / "metrics.json"
    return json.loads(metrics.read_text()) if resume == "auto" and reached_end(run_dir, last_step) else None


def reached_end(run_dir: Path, last_step: int) -> bool:
    """metrics.json written and the checkpoint at the run's last step (one stopped early by
    train.max_steps writes metrics.json too, and resumes)."""
    meta = Path(run_dir) / "checkpoint" / METADATA
    return (Path(run_dir) / "metrics.json").exists() and (
        not meta.exists() or json.loads(meta.read_text()).get("step", 0) >= last_step)


def total_steps(cfg: DictConfig) -> int:
    return cfg.train.n_tokens // cfg.train.batch_size


def prepare_resume(cfg: DictConfig, run_dir: Path, info: DistInfo) -> bool:
    """Whether to resume `run_dir`'s checkpoint, after the checks a resume needs; rank 0 reads the
    files, and every rank gets its answer or its error."""
    answer: bool | UsageError = False
    if info.is_main:
        try:
            answer = checked_resume(cfg, run_dir)
        except UsageError as e:
            answer = e
    answer = distributed.broadcast_object(answer, info)
    if isinstance(answer, UsageError):
        raise answer
    return answer


def checked_resume(cfg: DictConfig, run_dir: Path) -> bool:
    """train.resume for `run_dir`: a crashed checkpoint swap undone, a damaged newest checkpoint
    replaced by the one before it, and a finished run or another run's config refused."""
    ckpt = run_dir / "checkpoint"
    recover_dir(ckpt)  # a crash while the last checkpoint was being swapped in
    if cfg.train.resume is False:
        return False
    fall_back_if_damaged(ckpt)
    if not resolve_resume(cfg.train.resume, ckpt / TRAINER_STATE):
        return False
    if reached_end(run_dir, total_steps(cfg)):
        raise UsageError(f"{run_dir} holds a finished run (metrics.json, step {total_steps(cfg)} of {total_steps(cfg)}): "
                         "nothing to resume; train into a new run dir, or pass train.resume=auto, which returns its metrics")
    saved, _ = read_config(ckpt)
    differ = [f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in config_differences(saved, cfg)]
    if differ:
        raise UsageError(f"train.resume: {ckpt} was trained with another config ({'; '.join(differ)}); resume "
                         "with the checkpoint's values, or train into a new run dir")
    return True


RESUME_MUST_MATCH = ("arch", "act", "model.name", "train.batch_size", "train.n_tokens", "train.dtype",
                     "train.tensor_parallel")
"""What decides the shapes and the schedule a trainer state belongs to."""


def config_differences(saved: DictConfig, cfg: DictConfig) -> list[tuple[str, object, object]]:
    diffs = []
    for key in RESUME_MUST_MATCH:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        old, new = (flatten(OmegaConf.to_container(v), f"{key}.") if isinstance(v, DictConfig) else {key: v}
                    for v in (old, new))
        diffs += [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return diffs


def fall_back_if_damaged(ckpt: Path) -> None:
    """A damaged newest checkpoint is set aside as checkpoint.damaged and checkpoint.prev takes its
    place, with a warning; with nothing to fall back to, one error line naming the file."""
    if not ckpt.exists():
        return
    try:
        verify(ckpt, CHECKPOINT_FILES)
    except DamagedCheckpoint as damage:
        prev = previous(ckpt)
        if not prev.exists():
            raise DamagedCheckpoint(f"{damage}, and there is no earlier checkpoint to fall back to (train.keep_last=2 "
                                    "keeps one): train again into a new run dir") from None
        try:
            verify(prev, CHECKPOINT_FILES)
        except DamagedCheckpoint as also:
            raise DamagedCheckpoint(f"{damage}, and the previous checkpoint too: {also}") from None
        aside = ckpt.with_name(ckpt.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        prev.rename(ckpt)
        step = json.loads((ckpt / METADATA).read_text()).get("step")
        log.warning(f"{damage}: resuming from the previous checkpoint (step {step}); the damaged one is in {aside}")
