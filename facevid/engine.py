"""Distributed engines: how the model is wrapped, checkpointed and consolidated, and which ranks do what.

The engine is chosen by the `accelerate launch` config (configs/accelerate/*.yaml), never by the training
config, so one recipe runs unchanged on one GPU, on many with DDP, or sharded with FSDP2:

- `DataParallelEngine` ("ddp"; also one process): every rank holds the whole model; Accelerate's
  save_state/load_state; rank 0 alone can validate and save (its weights are everyone's).
- `DeepSpeedZeroEngine` ("zero2", "zero1"): DeepSpeed ZeRO through Accelerate; optimizer state (and
  gradients) partitioned, parameters whole on every rank, so everything else works as under DDP.
- `DeepSpeedZero3Engine` ("zero3"): DeepSpeed ZeRO-3 through Accelerate; parameters partitioned too (each rank
  holds a flat 1/N slice, `param.ds_tensor`, plus its fp32 master slice in the optimizer). The EMA is kept per
  rank over the fp32 master slices, checkpoints are DeepSpeed's per-rank files plus one EMA file per rank, and
  full weights are gathered slice by slice onto rank 0 for the final save.
- `FSDP2Engine` ("fsdp2"): `torch.distributed.fsdp.fully_shard` through Accelerate, one FSDP unit per
  `UNetLayer` plus the root; with a launch config's parallelism_config, HSDP (sharded within a node,
  replicated across nodes: configs/accelerate/hsdp.yaml). Each rank holds 1/N of the parameters, gradients, AdamW state and EMA
  shadow (DTensors, same placement). Checkpoints are sharded (torch distributed checkpoint, DCP); a
  plain full model exists only on rank 0 and only while validating or writing the final weights.

The Trainer calls only `prepare`, `save_state`, `load_state`, `ema_weights`, `consolidated` and `replicated`;
stages and the Trainer split per-rank work with `rank_share` / `gather_on_main`, and wait with `patient_barrier`.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
)
from diffusers.training_utils import EMAModel
from torch import nn

from facevid.ema import ema_weights, trainable_parameters

logger = logging.getLogger("facevid")

# The FSDP wrap unit: one resnet + transformers block of FaceVidUNet3D (models/unet3d.py). FaceVidDiT's is DiTBlock,
# named by its _no_split_modules (what Accelerate wraps when the launch config names no class).
FSDP_WRAP_UNIT = "UNetLayer"
# `accelerate launch` exports this with a config's parallelism_config (HSDP: dp_replicate_size x dp_shard_size).
HSDP_SWITCH = "ACCELERATE_USE_PARALLELISM_CONFIG"
EMA_SHARDS_DIR = "ema_shards"  # inside a checkpoint folder: the EMA shadow, one DCP shard per rank


def process_group_kwargs(timeout_s: int) -> InitProcessGroupKwargs:
    """How long a collective may wait for the slowest rank before the run fails (NCCL/gloo timeout)."""
    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


# Waits of unknown length (one rank generating data or evaluating, uneven cache-build shares) go through a
# separate gloo group with this timeout, so train.process_group_timeout_s can stay short for training collectives.
PATIENT_TIMEOUT = timedelta(days=2)
_patient_group = None


def patient_barrier(accelerator: Accelerator) -> None:
    """accelerator.wait_for_everyone() for waits that may outlast the process-group timeout."""
    global _patient_group
    if accelerator.num_processes == 1:
        return
    if _patient_group is None:  # every rank gets here (it is a barrier), so creating the group is collective
        _patient_group = torch.distributed.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    torch.distributed.barrier(group=_patient_group)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on any: ranks must take the same branch around collectives."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


def on_main_process(accelerator: Accelerator, work):
    """work() on the main process only; its result (or the exception it raised, re-raised) on every rank.
    Collective: every rank must call it; the result must pickle. For start-up checks of the data: reading 270k
    clips' headers on every rank multiplies the file-system load by the rank count, for the same answer."""
    if accelerator.num_processes == 1:
        return work()
    shared: list = [None]
    if accelerator.is_main_process:
        try:
            shared = [(True, work())]
        except Exception as err:  # every rank must fail alike, not wait forever for a result
            shared = [(False, err)]
    broadcast_object_list(shared, from_process=0)
    ok, value = shared[0]
    if not ok:
        raise value
    return value


def build_accelerator(cfg, run_dir: Path) -> Accelerator:
    """One Accelerator for every machine, from a RunConfig: the CPU case must say cpu=True, or
    `accelerate launch --multi_gpu` on a CPU box starts independent, non-distributed processes."""
    on_gpu = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    # On the CPU Accelerate refuses a parallelism config (HSDP) for its MULTI_CPU state; the FSDP switch below
    # attaches it once the state is FSDP.
    hidden = {HSDP_SWITCH: os.environ.pop(HSDP_SWITCH)} if not on_gpu and HSDP_SWITCH in os.environ else {}
    try:
        return Accelerator(
            cpu=not on_gpu,
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
            kwargs_handlers=[process_group_kwargs(cfg.train.process_group_timeout_s),
                             # Image batches skip the temporal layers: DDP must expect parameters without a gradient.
                             DistributedDataParallelKwargs(find_unused_parameters=cfg.data.image_batch_share > 0)],
        )
    finally:
        os.environ.update(hidden)


def requested_engine() -> str:
    """The engine the launcher asked for: `accelerate launch` exports its config as environment variables."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("1", "2", "3"):
            raise RuntimeError(f"the accelerate config asks for DeepSpeed zero_stage {stage}; valid: 1, 2 or 3 "
                               "(configs/accelerate/zero2.yaml, zero3.yaml)")
        return f"zero{stage}"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RuntimeError(f"the accelerate config asks for FSDP version {version}; facevid supports "
                               "fsdp_version: 2 only (see configs/accelerate/fsdp2.yaml)")
        return "fsdp2"
    return "ddp"


def build_engine(accelerator: Accelerator, train=None) -> DataParallelEngine:
    """The engine for this launch; raises when Accelerate did not set up what the launcher asked for.
    `train`: the run's TrainConfig (DeepSpeed takes batch size and gradient clipping into its own config)."""
    wanted = requested_engine()
    patient_barrier(accelerator)  # creates its group now, while every rank is at the same point
    if wanted == "ddp":
        return DataParallelEngine(accelerator)
    if wanted.startswith("zero"):
        if accelerator.distributed_type != DistributedType.DEEPSPEED and accelerator.device.type == "cpu":
            _switch_cpu_group_to_deepspeed(accelerator)
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise RuntimeError(f"the launch config asks for DeepSpeed but Accelerate set up "
                               f"{accelerator.distributed_type} (a silent fallback); refusing to train")
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            return DeepSpeedZero3Engine(accelerator, train)
        return DeepSpeedZeroEngine(accelerator, train)
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
    if os.environ.get(HSDP_SWITCH, "false").lower() == "true":  # HSDP: the 2D mesh build_accelerator held back
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig()  # reads the PARALLELISM_CONFIG_* variables
        AcceleratorState._shared_state["parallelism_config"] = config
        AcceleratorState._shared_state["device_mesh"] = config.get_device_mesh("cpu")
        config._validate_accelerator(accelerator)
    logger.warning("CPU process group: FSDP2 enabled on gloo (Accelerate would have fallen back to DDP)")


def rank_share(count: int, accelerator: Accelerator) -> tuple[list[int], int]:
    """This rank's share of `count` work items (validation videos, held-out batches): (indices, how many are
    real). Every rank gets the same number of indices, padded with repeats of the last item, because under
    FSDP every forward is a collective that all ranks must join; the padding's results are dropped."""
    per_rank = -(-count // accelerator.num_processes)
    start = accelerator.process_index * per_rank
    indices = list(range(start, min(start + per_rank, count)))
    return indices + [count - 1] * (per_rank - len(indices)), len(indices)


def gather_on_main(results: list, indices: list[int], real: int, count: int, accelerator: Accelerator):
    """Every rank's real results, in item order, on the main process (None elsewhere). Collective."""
    from accelerate.utils import gather_object

    everything = dict(gather_object(list(zip(indices[:real], results[:real]))))
    if not accelerator.is_main_process:
        return None
    assert sorted(everything) == list(range(count)), sorted(everything)
    return [everything[i] for i in range(count)]


def _switch_cpu_group_to_deepspeed(accelerator: Accelerator) -> None:
    """As _switch_cpu_group_to_fsdp, for a DeepSpeed config: Accelerate (1.16) keeps the plugin out of a CPU
    process group. DeepSpeed itself runs on the CPU with DS_ACCELERATOR=cpu (gloo)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin

    if os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError("DeepSpeed on a CPU machine needs DS_ACCELERATOR=cpu in the environment")
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"cannot run DeepSpeed on a {accelerator.distributed_type} CPU setup; launch with a "
                           "DeepSpeed config and 2+ processes (configs/accelerate/zero2_2proc_cpu.yaml)")
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher exported
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["deepspeed_plugins"] = plugin
    logger.warning("CPU process group: DeepSpeed enabled on gloo (Accelerate would have fallen back to DDP)")


class DataParallelEngine:
    """Whole model on every rank (DDP, or a single process)."""

    name = "ddp"
    replicated = True  # every rank holds identical weights: the replica check applies

    def __init__(self, accelerator: Accelerator, train=None):
        self.accelerator = accelerator
        self.train = train

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        return self.accelerator.prepare(model, optimizer, scheduler)

    def save_state(self, folder: Path, ema=None) -> None:
        self.accelerator.save_state(str(folder))

    def load_state(self, folder: Path, ema=None) -> None:
        self.accelerator.load_state(str(folder))

    @staticmethod
    @contextmanager
    def ema_weights(model: nn.Module, ema=None):
        """`model` in eval mode with the EMA weights (when there is an EMA); the training weights come back after."""
        with ema_weights(ema, model):
            model.eval()
            try:
                yield model
            finally:
                _reshard(model)  # before the training weights go back into the shards
                model.train()

    def consolidated(self, model: nn.Module, ema=None):
        """(full model, its EMA) on the main process, (None, None) elsewhere. Every rank must call it.
        Here the training model itself (no copy)."""
        if not self.accelerator.is_main_process:
            return None, None
        return self.accelerator.unwrap_model(model), ema


class DeepSpeedZeroEngine(DataParallelEngine):
    """DeepSpeed ZeRO stage 1/2 through Accelerate: AdamW state (and with stage 2 gradients) sharded across
    ranks, parameters whole on every rank, so EMA, validation and the final save work as under DDP."""

    def __init__(self, accelerator: Accelerator, train=None):
        super().__init__(accelerator, train)
        self.stage = accelerator.state.deepspeed_plugin.zero_stage
        self.name = f"zero{self.stage}"

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        import deepspeed

        acc = self.accelerator
        config = acc.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed owns the micro-batch size, accumulation and clipping: take them from the training config.
        # `accelerate launch` exports the YAML's gradient_accumulation_steps, which the Accelerator prefers to the
        # trainer's value: set it back, or train.gradient_accumulation_steps would be silently ignored.
        acc.gradient_accumulation_steps = self.train.gradient_accumulation_steps
        config["train_micro_batch_size_per_gpu"] = self.train.batch_size
        config["gradient_accumulation_steps"] = acc.gradient_accumulation_steps
        config["gradient_clipping"] = self.train.max_grad_norm
        config.pop("train_batch_size", None)  # derived by DeepSpeed from the three above and the world size
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if not isinstance(model, deepspeed.DeepSpeedEngine) or model.zero_optimization_stage() != self.stage:
            raise RuntimeError(f"DeepSpeed ZeRO-{self.stage} was requested but prepare returned {type(model).__name__}")
        if self.stage < 3:
            logger.info("DeepSpeed ZeRO-%d on %d ranks: AdamW state%s partitioned, parameters whole on every rank",
                        self.stage, acc.num_processes, " and gradients" if self.stage == 2 else "")
        return model, optimizer, scheduler


EMA_PARTITION_FILE = "ema_partition_rank{rank}.pt"  # inside a ZeRO-3 checkpoint folder: one rank's EMA slices


class DeepSpeedZero3Engine(DeepSpeedZeroEngine):
    """DeepSpeed ZeRO-3: parameters, gradients and AdamW state partitioned over the ranks.

    Outside DeepSpeed's forward hooks a parameter's `.data` is empty: its values are this rank's flat slice
    `param.ds_tensor` (compute dtype, what forwards gather) and the optimizer's fp32 master slice of the same
    elements. Whatever reads or writes weights here goes through those slices, never through a full replica."""

    name = "zero3"
    replicated = False  # each rank holds different slices by design

    def __init__(self, accelerator: Accelerator, train=None):
        super().__init__(accelerator, train)
        if accelerator.state.deepspeed_plugin.zero3_init_flag:
            # It would build every transformers model (the frozen text encoder too) partitioned under
            # deepspeed.zero.Init, although only the trained model goes through DeepSpeed.
            raise RuntimeError("zero3_init_flag: true is not supported (the trained model is partitioned when "
                               "DeepSpeed wraps it); set zero3_init_flag: false in the accelerate config "
                               "(configs/accelerate/zero3.yaml)")
        from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

        # Accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says; from_pretrained
        # would then build the frozen text encoder partitioned, outside any DeepSpeed engine (its forward fails).
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        acc = self.accelerator
        # Weightless copy on rank 0 that the gathered full weights go into (validation on rank 0, final save).
        self._skeleton = _meta_copy(model) if acc.is_main_process else None
        if acc.mixed_precision == "bf16":
            # Accumulate the gradient slices in fp32 (DeepSpeed's default under bf16 is bf16, whose sums over many
            # micro-batches lose the low bits); 2 more bytes per element of the slice. Communication stays bf16.
            acc.state.deepspeed_plugin.deepspeed_config.setdefault("data_types", {}).setdefault(
                "grad_accum_dtype", "fp32")
        model, optimizer, scheduler = super().prepare(model, optimizer, scheduler)
        module = acc.unwrap_model(model)
        params = list(module.parameters())
        if not all(hasattr(p, "ds_tensor") for p in params):
            raise RuntimeError("DeepSpeed ZeRO-3 prepare left parameters without a partition (ds_tensor)")
        self._trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]  # the EMA's order
        if ema is not None:
            # Same values as at construction (nothing has trained yet), now as this rank's fp32 slices.
            ema.shadow_params = [_master_slice(p).detach().clone() for p in params if p.requires_grad]
            ema.temp_stored_params = None
            ema.__class__ = _PartitionedEMA
        persistent = sum(p.ds_numel for p in params if p.ds_persist)
        logger.info("DeepSpeed ZeRO-3 on %d ranks: parameters, gradients and AdamW state partitioned; this rank "
                    "holds %.2fM of %.2fM parameters (%.2fM small ones kept gathered: "
                    "stage3_param_persistence_threshold)", acc.num_processes,
                    sum(p.ds_tensor.numel() for p in params) / 1e6, sum(p.ds_numel for p in params) / 1e6,
                    persistent / 1e6)
        return model, optimizer, scheduler

    @contextmanager
    def ema_weights(self, model: nn.Module, ema=None):
        """As DataParallelEngine.ema_weights, and afterwards every gathered parameter is released: forwards outside
        training (validation) can leave layers gathered, a full model's worth of memory kept into training."""
        try:
            with DataParallelEngine.ema_weights(model, ema) as swapped:
                yield swapped
        finally:
            _release_gathered(list(model.parameters()))

    # ------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path, ema=None) -> None:
        """DeepSpeed writes each rank's model and optimizer partitions; each rank writes its EMA slices."""
        self.accelerator.save_state(str(folder))
        if ema is not None:
            acc = self.accelerator
            torch.save({"world_size": acc.num_processes, "names": self._trainable_names,
                        "shadow_params": [s.detach().cpu() for s in ema.shadow_params]},
                       Path(folder) / EMA_PARTITION_FILE.format(rank=acc.process_index))

    def load_state(self, folder: Path, ema=None) -> None:
        acc = self.accelerator
        written = len(list(Path(folder).glob("pytorch_model*/zero_pp_rank_*_model_states.pt")))
        if written != acc.num_processes:  # DeepSpeed would fail later, less clearly
            raise RuntimeError(f"{folder} holds ZeRO-3 partitions of {written} rank(s); this run has "
                               f"{acc.num_processes}: resume with the number of ranks that wrote it")
        acc.load_state(str(folder))
        if ema is None:
            return
        path = Path(folder) / EMA_PARTITION_FILE.format(rank=acc.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} was not written by a ZeRO-3 run with EMA on "
                                    f"{acc.num_processes} ranks (resume it with the engine and rank count that "
                                    "wrote it)")
        saved = torch.load(path, weights_only=True)
        if saved["world_size"] != acc.num_processes or saved["names"] != self._trainable_names:
            raise RuntimeError(f"{path} holds EMA slices for {saved['world_size']} ranks and "
                               f"{len(saved['names'])} trainable tensors; this run has {acc.num_processes} ranks "
                               f"and {len(self._trainable_names)}: resume with the launch config that wrote it")
        for shadow, value in zip(ema.shadow_params, saved["shadow_params"]):
            shadow.copy_(value)

    # ----------------------------------------------------------- full weights
    @torch.no_grad()
    def consolidated(self, model: nn.Module, ema=None):
        """The fp32 master weights (and EMA) gathered slice by slice into a plain model on rank 0, on the training
        device. Collective: every rank must call it; the others get (None, None) and never hold a full copy."""
        acc = self.accelerator
        module = acc.unwrap_model(model)
        full = {}
        for name, p in module.named_parameters():
            # Frozen parameters have no fp32 master: their slice is in the compute dtype.
            whole = _gather_slices(p, _master_slice(p) if p.requires_grad else p.ds_tensor)
            if acc.is_main_process:
                full[name] = whole.cpu()
        trainable = [p for p in module.parameters() if p.requires_grad]
        shadows = []
        for p, shadow in zip(trainable, ema.shadow_params if ema is not None else []):
            whole = _gather_slices(p, shadow)
            if acc.is_main_process:
                shadows.append(whole)
        if not acc.is_main_process:
            return None, None
        plain = _meta_copy(self._skeleton)  # a fresh one: the skeleton itself never holds weights between calls
        dtypes = {n: q.dtype for n, q in plain.named_parameters()}
        result = plain.load_state_dict({n: t.to(dtypes[n]) for n, t in full.items()}, strict=False, assign=True)
        buffers = {n for n, _ in plain.named_buffers()}
        if result.unexpected_keys or set(result.missing_keys) - buffers:  # buffers were copied with the skeleton
            raise RuntimeError(f"gathered ZeRO-3 weights do not fit the model: {result}")
        plain.to(acc.device)
        plain_ema = None
        if ema is not None:
            plain_ema = copy.copy(ema)
            plain_ema.__class__ = EMAModel  # a plain one again
            plain_ema.shadow_params = [s.to(acc.device, dtypes[n]) for n, s in zip(self._trainable_names, shadows)]
            plain_ema.temp_stored_params = None
        return plain, plain_ema


class FSDP2Engine(DataParallelEngine):
    """Sharded parameters, gradients, optimizer state and EMA (FSDP2 through Accelerate)."""

    name = "fsdp2"
    replicated = False  # each rank holds different shards by design

    def prepare(self, model: nn.Module, optimizer, scheduler, ema=None):
        acc = self.accelerator
        plugin = acc.state.fsdp_plugin
        self._check_wrap_units(model, plugin)
        from torch.distributed.fsdp import CPUOffloadPolicy

        # FSDP2 holds an OffloadPolicy either way; only CPUOffloadPolicy offloads.
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and acc.device.type == "cpu":
            raise RuntimeError("fsdp_offload_params: true needs GPUs (it pins host memory); on a CPU machine the "
                               "shards already live in host memory: set it to false")
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
        self._trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]  # the EMA's order
        if not any(_is_dtensor(p) for p in model.parameters()):
            raise RuntimeError("FSDP2 prepare left no DTensor parameter: the model is not sharded")
        if ema is not None:
            # Same values as at construction (nothing has trained yet), now as local shards.
            ema.shadow_params = [p.detach().clone() for p in trainable_parameters(model)]
            ema.__class__ = _ShardedEMA
        from torch.distributed.fsdp import FSDPModule

        mesh = next(p for p in model.parameters() if _is_dtensor(p)).device_mesh
        logger.info("FSDP2 on %d ranks: %d FSDP units (each %s, and the root); this rank holds %.2fM of %.2fM "
                    "parameters; mesh %s", acc.num_processes, sum(isinstance(m, FSDPModule) for m in model.modules()),
                    FSDP_WRAP_UNIT, sum(local_shard(p).numel() for p in model.parameters()) / 1e6,
                    sum(p.numel() for p in model.parameters()) / 1e6,
                    dict(zip(mesh.mesh_dim_names or ("shard",), mesh.shape)))
        return model, optimizer, scheduler

    @staticmethod
    def _check_wrap_units(model: nn.Module, plugin) -> None:
        names = plugin.transformer_cls_names_to_wrap or []
        names = names.split(",") if isinstance(names, str) else list(names)
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        own = getattr(model, "_no_split_modules", None)  # FaceVidDiT: DiTBlock
        if missing and own:
            raise RuntimeError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which {type(model).__name__} "
                               f"does not contain; its wrap unit is {','.join(own)}: launch with "
                               f"--fsdp_transformer_layer_cls_to_wrap {','.join(own)}")
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
        plain = _meta_copy(self._skeleton)  # a fresh one: the skeleton itself never holds weights between calls
        plain.load_state_dict(full, assign=True)
        plain.to(acc.device)
        plain_ema = None
        if ema is not None:
            plain_ema = copy.copy(ema)
            plain_ema.__class__ = EMAModel  # a plain one again
            plain_ema.shadow_params = [s.to(acc.device) for s in shadows]
            plain_ema.temp_stored_params = None
        return plain, plain_ema


def _reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root unit's weights gathered after a forward that no backward follows (inference):
    shard them again, so that every parameter is a DTensor shard for the EMA swap and the next step."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters live on the meta device (no memory); buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (FSDP2 DTensor, ZeRO-3 parameter slice); any other tensor as it is."""
    if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 parameter's own .data is empty outside its forward
        return tensor.ds_tensor
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if _is_dtensor(tensor) else tensor).cpu()


class _ShardedEMA(EMAModel):
    """An EMAModel whose shadow tensors are this rank's shards (FSDP2: DTensors). Accelerate writes registered
    objects from rank 0 alone, so its checkpoint keeps only the counters; the engine's save_state writes the
    shards."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("shadow_params")
        return state


def _master_slice(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master slice of a trainable ZeRO-3 parameter (a view into the optimizer's flat group)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


def _gather_slices(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """The full tensor of `param` from every rank's slice `local` (same layout as param.ds_tensor: rank r holds
    elements [r * n, (r + 1) * n) of the flattened, end-padded parameter). Collective, one parameter at a time."""
    world = torch.distributed.get_world_size()
    if param.ds_zero_partition_world_size != world:
        raise RuntimeError(f"ZeRO-3 partitions over {param.ds_zero_partition_world_size} of {world} ranks "
                           "(hierarchical partitioning) is not supported")
    pieces = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(pieces, local.contiguous())
    return torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)


def _release_gathered(params: list[nn.Parameter]) -> None:
    """Drops every gathered copy of the model's ZeRO-3 parameters (the small persistent ones too); the next
    forward gathers them again from the slices. Local: no communication."""
    if params:
        params[0]._z3_optimizer.empty_partition_cache()


def _write_slices(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Puts `values` (one slice per parameter) into the ZeRO-3 slices forwards gather from, and drops every
    gathered copy, so the next forward sees the new values."""
    with torch.no_grad():
        for p, value in zip(params, values):
            p.ds_tensor.data.copy_(value)
    _release_gathered(params)


class _PartitionedEMA(_ShardedEMA):
    """The EMA over this rank's ZeRO-3 slices: shadows are fp32 slices updated from the fp32 master slices
    (no rank ever holds a full copy). Handed the model's (empty-looking) parameters, as the Trainer does, it
    works on their slices; for validation the EMA slices go into the compute slices and back."""

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        self.cur_decay_value = decay = self.get_decay(self.optimization_step)
        masters = [_master_slice(p) for p in parameters]
        torch._foreach_sub_(self.shadow_params, torch._foreach_sub(self.shadow_params, masters), alpha=1 - decay)

    def store(self, parameters) -> None:
        self.temp_stored_params = [p.ds_tensor.detach().clone() for p in parameters]

    def copy_to(self, parameters) -> None:
        _write_slices(list(parameters), self.shadow_params)

    def restore(self, parameters) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("restore() without store()")
        _write_slices(list(parameters), self.temp_stored_params)
        self.temp_stored_params = None
