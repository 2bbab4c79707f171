"""The training loop: one :class:`Trainer` holds the model, optimizer, schedule and scaler.

Built from torch's own pieces: ``DistributedDataParallel`` under torchrun (gloo on CPU, nccl
on CUDA), ``torch.autocast`` (bfloat16 on CPU, float16 with a ``GradScaler`` on CUDA) and
``torch.utils.checkpoint`` (:mod:`.memory`). Each epoch trains on the augmented train set in
training mode (the random sampler redraws every forward), then validates the converted model in
eval mode; counts are summed over processes. :meth:`Trainer.state_dict` is what
:mod:`.resume` writes, and :meth:`Trainer.load_state_dict` continues from it exactly.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .._helpers import logits_of
from ..core.diffstride import diffstride_cost, diffstride_layers
from ..data import Batch, Item, Skipped, collate_items, shard_indices
from ..errors import DataError, ParameterError
from ..metrics import topk_correct
from ..runtime import DistributedContext, peak_rss_since_reset, reset_peak_rss, synchronize
from .data import GlobalBatchSampler, mix_batch
from .memory import checkpoint_blocks, is_out_of_memory, out_of_memory_error
from .params import check_freeze_norm_stats, hold_frozen_statistics, select_trainable
from .recipe import TrainConfig, build_optimizer, build_scheduler
from .resume import restore_rng_states, rng_states

__all__ = ["EpochRecord", "StepInfo", "Trainer", "best_record", "hard_targets"]

logger = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """What one epoch measured (losses are per image; top-k in %). ``peak_memory_bytes``: the
    training pass's peak, CUDA memory allocated or (CPU) this process's resident high-water mark."""

    epoch: int
    train_loss: float
    train_top1: float
    val_loss: float | None
    val_top1: float | None
    val_top5: float | None
    lr: float
    seconds: float
    images_per_s: float
    peak_memory_bytes: int | None
    skipped: int = 0
    val_agreement: float | None = None  # distillation: top-1 agreement with the teacher, %
    val_kl: float | None = None  # distillation: mean KL(teacher || student) per image, at temperature 1


@dataclass
class StepInfo:
    """Progress within an epoch, for a progress bar."""

    epoch: int
    step: int
    steps: int
    loss: float
    lr: float
    images: int  # images trained on so far this epoch, over all processes


def best_record(records: list[EpochRecord]) -> EpochRecord | None:
    """The first epoch with the highest val top-1, or agreement with the teacher without labels
    (None without validation)."""
    scored = [r for r in records if _score(r) is not None]
    return max(scored, key=_score) if scored else None


def _score(record: EpochRecord) -> float | None:
    return record.val_top1 if record.val_top1 is not None else record.val_agreement


def hard_targets(targets: Tensor) -> Tensor:
    """Class indices: as given, or each mixed row's largest share."""
    return targets.argmax(1) if targets.ndim == 2 else targets


def _as_batch(batch: Any) -> tuple[Tensor, Tensor, int]:
    """(images, targets, skipped files) from our collate's Batch or a plain (images, targets) pair."""
    if isinstance(batch, Batch):
        return batch.images, batch.targets, len(batch.skipped)
    images, targets = batch
    return images, targets, 0


def _collate(items: list) -> Any:
    """Decoded files (Item, or Skipped when unreadable) through our collate; pairs through torch's."""
    if any(isinstance(item, (Item, Skipped)) for item in items):
        return collate_items(items)
    return default_collate(items)


class Trainer:
    """Train a (converted) model; ``model`` shares its parameters with the original.

    ``train_set`` and ``val_set`` yield ``(image, target)`` pairs or :class:`~ccnn_convert.data.Item`
    (a decoded file; unreadable files are skipped and counted). ``val_set`` may be None.
    Seeds torch's generator with ``config.seed`` (plus the rank), as a training script does.
    Validation runs under the same autocast as training (``config.amp``).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig, *,
                 device: torch.device | str = "cpu", ctx: DistributedContext | None = None, workers: int = 0,
                 on_step: Callable[[StepInfo], None] | None = None):
        self.config, self.device = config, torch.device(device)
        self.ctx = ctx or DistributedContext()
        self.train_set, self.val_set, self.workers, self.on_step = train_set, val_set, workers, on_step
        _check_options(config, self.device, self.ctx)
        torch.manual_seed(config.seed + 1_000_003 * self.ctx.rank)  # ranks augment and sample differently
        _check_stride_penalty(config, model)
        self.model = model.to(self.device)
        if config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        select_trainable(self.model, config.train_params)  # before DDP and the optimizer see the parameters
        check_freeze_norm_stats(self.model, config.freeze_norm_stats)
        self.train_module = checkpoint_blocks(self.model) if config.checkpointing else self.model
        self.wrapped = self._distributed(self.train_module)
        self.optimizer = build_optimizer(self.model, config)
        self.batches = GlobalBatchSampler(len(train_set), config.batch_size, rank=self.ctx.rank,
                                          world_size=self.ctx.world_size, seed=config.seed)
        self.scheduler = build_scheduler(self.optimizer, config, len(self.batches))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp and self.device.type == "cuda")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.epoch = 0
        self.history: list[EpochRecord] = []

    def _distributed(self, module: nn.Module) -> nn.Module:
        if not self.ctx.active:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # ------------------------------------------------------------------ one epoch

    def _autocast(self):
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.config.amp)

    def _step(self, images: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        with self._autocast():
            logits = logits_of(self.wrapped(images)).float()
        loss = self._regularised(self.label_loss(logits, targets))
        self._update(loss)
        return loss.detach(), int(logits.argmax(1).eq(hard_targets(targets)).sum())

    def uses_labels(self) -> bool:
        """Whether the loss reads the targets (a batch mix then mixes them too)."""
        return True

    def label_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy against class indices, or against mixed class probabilities (a mix's
        one-hot rows cover the classes up to the batch's largest label: the rest are 0)."""
        if targets.ndim == 2 and targets.shape[1] < logits.shape[1]:
            targets = nn.functional.pad(targets, (0, logits.shape[1] - targets.shape[1]))
        return self.loss_fn(logits, targets)

    def _mixed(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The batch after ``config.batch_mix`` (if any); the targets mixed alike where the loss reads them."""
        if self.config.batch_mix is None:
            return images, targets
        if not self.uses_labels():
            return mix_batch(images, None, self.config.batch_mix)[0], targets
        return mix_batch(images, targets, self.config.batch_mix, num_classes=int(targets.max()) + 1)

    def _regularised(self, loss: Tensor) -> Tensor:
        """``loss`` plus the paper's complexity regulariser on DiffStride's learned strides, if asked for."""
        if self.config.stride_penalty:
            loss = loss + self.config.stride_penalty * diffstride_cost(self.model)
        return loss

    def _update(self, loss: Tensor) -> None:
        """One optimizer step (through the grad scaler) and one schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        seed = self.config.seed * 10_007 + self.epoch * 101 + self.ctx.rank  # worker seeds, per epoch and rank
        return DataLoader(dataset, num_workers=self.workers, collate_fn=_collate,
                          generator=torch.Generator().manual_seed(seed),
                          pin_memory=self.device.type == "cuda", **kwargs)

    def train_epoch(self) -> tuple[float, float, int, int, float]:
        """-> (loss sum, correct, images, skipped, seconds) of this process."""
        self.train_module.train()
        self.model.train()
        hold_frozen_statistics(self.model, self.config.train_params, self.config.freeze_norm_stats)
        self.batches.set_epoch(self.epoch)
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, images, skipped
        start = time.perf_counter()
        for step, batch in enumerate(self._loader(self.train_set, batch_sampler=self.batches)):
            images, targets, skipped = _as_batch(batch)
            if images.numel() == 0:
                raise DataError("no image of a training batch could be decoded")
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device)
            images, targets = self._mixed(images, targets)
            try:
                loss, correct = self._step(images, targets)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory_error(len(targets), self.config.checkpointing) from None
                raise
            totals += torch.tensor([float(loss) * len(targets), correct, len(targets), skipped], dtype=torch.float64)
            if self.on_step is not None:
                self.on_step(StepInfo(self.epoch, step + 1, len(self.batches), float(loss), self.lr,
                                      (step + 1) * self.config.batch_size))
        synchronize(self.device)
        return (*totals.tolist(), time.perf_counter() - start)  # type: ignore[return-value]

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float, float, int]:
        """-> (loss sum, top-1 correct, top-5 correct, images, skipped) of this process's shard."""
        self.model.eval()
        if self.ctx.active:  # every process validates (and rank 0 saves) rank 0's BatchNorm statistics
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        totals = torch.zeros(5, dtype=torch.float64)
        if self.val_set is None:
            return tuple(totals.tolist())  # type: ignore[return-value]
        shard = Subset(self.val_set, shard_indices(range(len(self.val_set)), self.ctx.rank, self.ctx.world_size))
        per_process = max(1, self.config.batch_size // self.ctx.world_size)
        for batch in self._loader(shard, batch_size=per_process, shuffle=False):
            images, targets, skipped = _as_batch(batch)
            totals[4] += skipped
            if images.numel() == 0:
                continue
            images, targets = images.to(self.device), targets.to(self.device)
            with self._autocast():
                logits = logits_of(self.model(images)).float()
            totals += self._validation_counts(images, logits, targets)
        return tuple(totals.tolist())  # type: ignore[return-value]

    def _validation_counts(self, images: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        """(loss sum, top-1 correct, top-5 correct, images, 0) of one validation batch."""
        hits = topk_correct(logits, targets, (1, 5))
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        return torch.tensor([float(loss), hits[1], hits[5], len(targets), 0], dtype=torch.float64)

    def _summed(self, values: list[float]) -> list[float]:
        if not self.ctx.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run_epoch(self) -> EpochRecord:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()  # this epoch's high-water mark, not the process's
        lr = self.lr
        loss_sum, correct, images, skipped, seconds = self.train_epoch()
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else peak_rss_since_reset())
        loss_sum, correct, images, skipped = self._summed([loss_sum, correct, images, skipped])
        v_loss, v_top1, v_top5, v_images, v_skipped = self._summed(list(self.validate()))
        has_val = v_images > 0
        record = EpochRecord(
            epoch=self.epoch + 1, train_loss=loss_sum / images, train_top1=100 * correct / images,
            val_loss=v_loss / v_images if has_val else None, val_top1=100 * v_top1 / v_images if has_val else None,
            val_top5=100 * v_top5 / v_images if has_val else None, lr=lr, seconds=seconds,
            images_per_s=images / seconds if seconds > 0 else 0.0, peak_memory_bytes=int(peak),
            skipped=int(skipped + v_skipped))
        self.history.append(record)
        self.epoch += 1
        return record

    def fit(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
        """Train until ``config.epochs`` epochs are done (fewer remain after a resume)."""
        while self.epoch < self.config.epochs:
            record = self.run_epoch()
            if on_epoch is not None:
                on_epoch(record)
        return self.history

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper, and with it its hold on the process group,
        so that destroying the group ends gloo's threads before the interpreter exits."""
        if self.wrapped is not self.train_module:
            self.wrapped = self.train_module
            gc.collect()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything the next epoch depends on (call on every process: RNG states are gathered)."""
        states = rng_states()
        if self.ctx.active:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": states, "epoch": self.epoch,
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_states(rng[self.ctx.rank])
        else:
            logger.warning(f"resuming with {self.ctx.world_size} process(es) instead of {len(rng)}: the "
                           "random draws (augmentation, random sampler) differ from an uninterrupted run")


def _check_stride_penalty(config: TrainConfig, model: nn.Module) -> None:
    if config.stride_penalty and not diffstride_layers(model):
        raise ParameterError("stride_penalty", "{param} penalises learned strides; the model has none "
                                               "(only mode diffstride learns them)")


def _check_options(config: TrainConfig, device: torch.device, ctx: DistributedContext) -> None:
    if config.sync_bn and not (device.type == "cuda" and ctx.active):
        raise ParameterError("sync_bn", "{param} needs several CUDA processes under torchrun (PyTorch's "
                                        "SyncBatchNorm runs on GPUs only)")
