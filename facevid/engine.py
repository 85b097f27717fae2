"""Distributed engines: how the model is wrapped, checkpointed and consolidated, and which ranks do what.

The engine is chosen by the `accelerate launch` config (configs/accelerate/*.yaml), never by the training
config, so one recipe runs unchanged on one GPU, on many with DDP, or sharded with FSDP2:

- `DataParallelEngine` ("ddp"; also one process): every rank holds the whole model; Accelerate's
  save_state/load_state; rank 0 alone can validate and save (its weights are everyone's).
- `FSDP2Engine` ("fsdp2"): `torch.distributed.fsdp.fully_shard` through Accelerate, one FSDP unit per
  `UNetLayer` plus the root. Each rank holds 1/N of the parameters, gradients, AdamW state and EMA
  shadow (DTensors, same placement). Checkpoints are sharded (torch distributed checkpoint, DCP); a
  plain full model exists only on rank 0 and only while validating or writing the final weights.

The Trainer calls only `prepare`, `save_state`, `load_state`, `consolidated` and `replicated`.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from diffusers.training_utils import EMAModel
from torch import nn

logger = logging.getLogger("facevid")

# The FSDP wrap unit: one resnet + transformers block of FaceVidUNet3D (models/unet3d.py).
FSDP_WRAP_UNIT = "UNetLayer"
EMA_SHARDS_DIR = "ema_shards"  # inside a checkpoint folder: the EMA shadow, one DCP shard per rank


def process_group_kwargs(timeout_s: int) -> InitProcessGroupKwargs:
    """How long a collective may wait for the slowest rank before the run fails (NCCL/gloo timeout)."""
    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


def requested_engine() -> str:
    """The engine the launcher asked for: `accelerate launch` exports its config as environment variables."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise RuntimeError("DeepSpeed launch configs are not supported by facevid's trainer yet; use "
                           "configs/accelerate/fsdp2.yaml (sharded) or multi_gpu.yaml (DDP)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RuntimeError(f"the accelerate config asks for FSDP version {version}; facevid supports "
                               "fsdp_version: 2 only (see configs/accelerate/fsdp2.yaml)")
        return "fsdp2"
    return "ddp"


def build_engine(accelerator: Accelerator) -> DataParallelEngine:
    """The engine for this launch; raises when Accelerate did not set up what the launcher asked for."""
    wanted = requested_engine()
    if wanted == "ddp":
        return DataParallelEngine(accelerator)
    if accelerator.distributed_type != DistributedType.FSDP and accelerator.device.type == "cpu":
        if accelerator.num_processes < 2:
            raise RuntimeError("FSDP2 on the CPU needs at least 2 processes (num_processes in the accelerate "
                               "config); one process has nothing to shard across")
        _switch_cpu_group_to_fsdp(accelerator)
    if not accelerator.is_fsdp2:
        raise RuntimeError(f"the launch config asks for FSDP2 but Accelerate set up {accelerator.distributed_type}"
                           " (a silent fallback to data parallelism); refusing to train")
    return FSDP2Engine(accelerator)


def _switch_cpu_group_to_fsdp(accelerator: Accelerator) -> None:
    """Accelerate (1.16) builds a CPU process group as MULTI_CPU and drops the FSDP plugin, so an FSDP config
    silently trains with DDP there. The gloo group itself is fine for FSDP2: set the shared state the way
    AcceleratorState does on GPUs. This touches Accelerate internals, hence the version pin in pyproject.toml;
    GPU launches never come here."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"cannot run FSDP2 on a {accelerator.distributed_type} CPU setup; launch with an FSDP "
                           "config and 2+ processes (configs/accelerate/fsdp2_2proc_cpu.yaml)")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher exported
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    logger.warning("CPU process group: FSDP2 enabled on gloo (Accelerate would have fallen back to DDP)")


class DataParallelEngine:
    """Whole model on every rank (DDP, or a single process)."""

    name = "ddp"
    replicated = True  # every rank holds identical weights: the replica check applies

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        return self.accelerator.prepare(model, optimizer, scheduler)

    def save_state(self, folder: Path, ema=None) -> None:
        self.accelerator.save_state(str(folder))

    def load_state(self, folder: Path, ema=None) -> None:
        self.accelerator.load_state(str(folder))

    def consolidated(self, model: nn.Module, ema=None):
        """(full model, its EMA) on the main process, (None, None) elsewhere. Every rank must call it.
        Here the training model itself (no copy)."""
        if not self.accelerator.is_main_process:
            return None, None
        return self.accelerator.unwrap_model(model), ema


class FSDP2Engine(DataParallelEngine):
    """Sharded parameters, gradients, optimizer state and EMA (FSDP2 through Accelerate)."""

    name = "fsdp2"
    replicated = False  # each rank holds different shards by design

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        acc = self.accelerator
        plugin = acc.state.fsdp_plugin
        self._check_wrap_units(model, plugin)
        if acc.mixed_precision in ("bf16", "fp16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # Compute in low precision; keep fp32 master weights (FSDP upcasts them) and reduce gradients in
            # fp32, so accumulating over many ranks and micro-batches loses nothing.
            dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16
            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # A weightless copy (parameters on the meta device, buffers kept) on rank 0: what the consolidated full
        # weights are loaded into for validation and the final save, without a second replica during training.
        self._skeleton = _meta_copy(model) if acc.is_main_process else None
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        self._trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not any(_is_dtensor(p) for p in model.parameters()):
            raise RuntimeError("FSDP2 prepare left no DTensor parameter: the model is not sharded")
        if ema is not None:
            # Same values as at construction (nothing has trained yet), now as local shards.
            ema.shadow_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            ema.__class__ = _ShardedEMA
        from torch.distributed.fsdp import FSDPModule

        logger.info("FSDP2 on %d ranks: %d FSDP units (each %s, and the root); this rank holds %.2fM of %.2fM "
                    "parameters", acc.num_processes, sum(isinstance(m, FSDPModule) for m in model.modules()),
                    FSDP_WRAP_UNIT, sum(_local(p).numel() for p in model.parameters()) / 1e6,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return model, optimizer, scheduler

    @staticmethod
    def _check_wrap_units(model: nn.Module, plugin) -> None:
        names = plugin.transformer_cls_names_to_wrap or []
        names = names.split(",") if isinstance(names, str) else list(names)
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise RuntimeError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which {type(model).__name__} "
                               f"does not contain; FSDP2 is for the t2v stage (wrap unit {FSDP_WRAP_UNIT}). Train "
                               "the VAE stage with DDP (configs/accelerate/multi_gpu.yaml or cpu_2proc.yaml)")

    # ------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path, ema=None) -> None:
        """Accelerate writes model and optimizer shards (DCP) and the rest; the EMA shards go next to them."""
        import torch.distributed.checkpoint as dcp

        self.accelerator.save_state(str(folder))
        if ema is not None:
            dcp.save({"ema": self._ema_dict(ema)}, checkpoint_id=str(Path(folder) / EMA_SHARDS_DIR))

    def load_state(self, folder: Path, ema=None) -> None:
        import torch.distributed.checkpoint as dcp

        self.accelerator.load_state(str(folder))
        if ema is not None:
            shards = Path(folder) / EMA_SHARDS_DIR
            if not shards.is_dir():
                raise FileNotFoundError(f"{shards} is missing: {folder} was not written by an FSDP2 run with EMA "
                                        "(resume it with the engine that wrote it)")
            dcp.load({"ema": self._ema_dict(ema)}, checkpoint_id=str(shards))  # in place, into the local shards

    def _ema_dict(self, ema) -> dict[str, torch.Tensor]:
        return dict(zip(self._trainable_names, ema.shadow_params))

    # ----------------------------------------------------------- full weights
    @torch.no_grad()
    def consolidated(self, model: nn.Module, ema=None):
        """Gathers the shards into a plain model (and a plain EMA) on rank 0, on the training device.
        Collective: every rank must call it; the others get (None, None)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        acc = self.accelerator
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        shadows = []
        for shadow in ema.shadow_params if ema is not None else []:
            gathered = _full(shadow)  # collective, one tensor at a time: only rank 0 keeps them
            if acc.is_main_process:
                shadows.append(gathered)
        if not acc.is_main_process:
            return None, None
        plain = self._skeleton
        plain.load_state_dict(full, assign=True)
        plain.to(acc.device)
        plain_ema = None
        if ema is not None:
            plain_ema = copy.copy(ema)
            plain_ema.__class__ = EMAModel  # a plain one again
            plain_ema.shadow_params = [s.to(acc.device) for s in shadows]
            plain_ema.temp_stored_params = None
        return plain, plain_ema


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters live on the meta device (no memory); buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if _is_dtensor(tensor) else tensor).cpu()


class _ShardedEMA(EMAModel):
    """An EMAModel whose shadow tensors are DTensor shards. Accelerate writes registered objects from rank 0
    alone, so its checkpoint keeps only the counters; FSDP2Engine.save_state writes the shards (DCP)."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("shadow_params")
        return state
