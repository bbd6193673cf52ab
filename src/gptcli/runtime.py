"""Where and how the math runs: device, precision (autocast, loss scaling), compile, seeding,
whether a model fits the device's memory, and the device's peak FLOP/s for MFU.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from decimal import Decimal

import torch

from gptcli.errors import GptcliError, shorten

BF16_MARGIN = 0.9  # on CPU, auto picks bf16 only if a step takes under 90% of fp32's time
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak FLOP/s of common GPUs by name fragment (datasheets, without sparsity).
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N, mps) asks for; errors name `option`, the
    setting it came from (`--device` of a command, `train.device` of a config)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptcliError(f"{option}: unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptcliError(f"{option}: '{name}' asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GptcliError(f"{option}: '{name}' does not exist ({torch.cuda.device_count()} GPUs)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptcliError("train.device: 'mps' asked for, but MPS is not available")
    return device


@dataclass(frozen=True)
class Precision:
    """The compute dtype under autocast and whether the loss needs scaling (fp16 only)."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device, cpu_trial=None,
                      option: str = "train.precision") -> Precision:
    """Turn `train.precision` (or the `option` named in errors) into a Precision. For `auto`
    on CPU, `cpu_trial(precision)` (seconds per step) decides between fp32 and bf16 by
    measurement; without a trial it is fp32. The trial is skipped (fp32) on a CPU whose
    bf16 products are slow (`bf16_matmul_is_fast`): there one bf16 step of the trial took
    longer than a minute of silence before the run began."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_trial is not None and bf16_matmul_is_fast(device):
            # bf16 must win clearly: on small models the two are close, and a coin toss
            # between runs would make results depend on machine noise.
            fp32, bf16 = (cpu_trial(Precision(p, "cpu")) for p in ("fp32", "bf16"))
            name = "bf16" if bf16 < BF16_MARGIN * fp32 else "fp32"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise GptcliError(f"{option}: fp16 is for GPUs; use bf16 or fp32 on CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptcliError(f"{option}: this GPU has no bf16; use fp16 (with loss scaling) or fp32")
    return Precision(name, device.type)


# Per process: (device type, index) -> whether bf16 matrix products beat fp32's there.
_BF16_FAST: dict[tuple[str, int | None], bool] = {}
# The probe: a stack of 4 products of 256 x 256 matrices (134 MFLOP), the size of a small
# model's Newton-Schulz step or attention block. About 1.5 ms in fp32 on a 2-core CPU;
# bf16 takes 0.1 s where the CPU has no bf16 instructions (oneDNN's reference kernel).
_PROBE_SHAPE = (4, 256, 256)


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products run clearly faster than fp32's on `device` (in under
    BF16_MARGIN of the time). On CUDA: whether the GPU has bf16. Elsewhere it is measured,
    once per process, because CPUs differ by two orders of magnitude: AMX and AVX-512 BF16
    run bf16 2-4x faster than fp32, while an AVX2-only CPU runs it 20-100x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    key = (device.type, device.index)
    if key not in _BF16_FAST:
        fp32, bf16 = _probe_matmul_seconds(device)
        _BF16_FAST[key] = bf16 < BF16_MARGIN * fp32
    return _BF16_FAST[key]


def _probe_matmul_seconds(device: torch.device, repeats: int = 7) -> tuple[float, float]:
    """The best times of batched products of the probe's shape in fp32 and in bf16, taken
    in turns so that a busy moment of a shared machine slows both alike. Stops early once
    bf16 is ten times slower: then its exact figure does not matter."""
    generator = torch.Generator().manual_seed(0)  # leaves the run's RNG stream alone
    a = torch.randn(_PROBE_SHAPE, generator=generator).to(device)
    operands = {torch.float32: a, torch.bfloat16: a.bfloat16()}
    best = dict.fromkeys(operands, float("inf"))
    for x in operands.values():
        torch.bmm(x, x)  # warm-up: kernel selection, thread pool start
    for _ in range(repeats):
        for dtype, x in operands.items():
            _sync(device)
            start = time.perf_counter()
            torch.bmm(x, x)
            _sync(device)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
        if best[torch.bfloat16] > 10 * best[torch.float32]:
            break
    return best[torch.float32], best[torch.bfloat16]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Inside: `module` in eval mode (no dropout); after, back in the mode it was in, even
    when the block raises. For evaluations and rollouts in the middle of training."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def should_compile(setting: str, device: torch.device) -> bool:
    """`train.compile`: on, off, or auto (on CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA generators too


# The least memory a parameter takes. Training in fp32 keeps the weight, its gradient and
# AdamW's two moments, 4 bytes each; activations come on top and are not counted, so a model
# that passes the check may still run out of memory, but one that fails it cannot fit.
TRAIN_BYTES_PER_PARAM = 16
INFER_BYTES_PER_PARAM = 4  # the fp32 weights alone


def check_memory(params: int, device: torch.device, training: bool, what: str, fix: str,
                 shards: int = 1) -> None:
    """Refuse a model of `params` parameters whose weights (and, to train, gradients and
    AdamW moments) cannot fit in `device`'s memory, before anything is allocated. Under
    FSDP over `shards` processes, each first builds the whole model, then keeps its share."""
    per_param = TRAIN_BYTES_PER_PARAM if training else INFER_BYTES_PER_PARAM
    needed = max(params * INFER_BYTES_PER_PARAM, params * per_param // shards)
    available = available_memory(device)
    if available is None or needed <= available:
        return
    parts = "fp32 weights, gradients and AdamW moments" if training else "fp32 weights"
    where = (f"{device} has {human_bytes(available)} free" if device.type == "cuda"
             else f"this machine has {human_bytes(available)} available")
    raise GptcliError(f"{what}: about {human_count(params)} parameters need at least "
                      f"{human_bytes(needed)} to {'train' if training else 'load'} ({parts}); "
                      f"{where}; {fix}")


def available_memory(device: torch.device) -> int | None:
    """Bytes a model can use: free memory on a CUDA GPU; otherwise (CPU, and MPS, which
    shares it) the machine's memory. None when it cannot be found out."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return _host_memory()


def _host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux: free memory plus the cache it can drop),
    else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def human_count(n: int) -> str:
    """A count in thousands: 1_234_567_890 -> '1.2B'."""
    return _in_thousands(n, ["", "K", "M", "B", "T"])


def human_bytes(n: int) -> str:
    """Bytes in decimal units: 19_600_000_000_000 -> '19.6 TB'."""
    return _in_thousands(n, [" bytes", " KB", " MB", " GB", " TB", " PB"])


def _in_thousands(n: int, units: list[str]) -> str:
    """`n` in the largest of `units` (each 1000 times the last) it reaches; past the last
    one, in powers of ten. Decimal, not float: an absurd config's count can pass 1e308."""
    power = 0
    while power + 1 < len(units) and n >= 1000 ** (power + 1):
        power += 1
    if n >= 1000 ** (power + 1):
        return f"{Decimal(n):.1e}{units[0]}"
    if power == 0:
        return f"{n}{units[0]}"
    return f"{Decimal(n) / 1000 ** power:.1f}{units[power]}"


def configure_matmul(device: torch.device) -> None:
    """TF32 for fp32 matrix products on Ampere and newer: much faster, ample precision."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Measured peaks, kept for the life of the process: (device type, device index, dtype) -> FLOP/s.
_MEASURED_PEAKS: dict[tuple[str, int | None, torch.dtype], float] = {}


def peak_flops(device: torch.device, precision: Precision, fresh: bool = False) -> float:
    """Peak FLOP/s to compute MFU against: datasheet figures for known GPUs, otherwise a large
    matrix product in the run's precision, timed once per process for each device and dtype
    (later runs in the same process reuse it). `fresh=True` times it again, for when a step
    beat the figure (the first timing ran on a busy host); the best timing seen is kept."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in _GPU_PEAK_BF16.items():
            if fragment in name:
                return flops if precision.name != "fp32" else flops / 2  # TF32 runs at half rate
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()  # "cuda" and "cuda:N" for the same GPU share a figure
    key = (device.type, index, precision.dtype)
    if fresh or key not in _MEASURED_PEAKS:
        measured = measure_matmul_flops(device, precision.dtype)
        _MEASURED_PEAKS[key] = max(measured, _MEASURED_PEAKS.get(key, 0.0))
    return _MEASURED_PEAKS[key]


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """FLOP/s of an n x n matrix product in `dtype`, the best of repeated timings."""
    generator = torch.Generator().manual_seed(0)  # leaves the run's RNG stream alone
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up: kernel selection, thread pool start
    while time.perf_counter() < deadline or best == float("inf"):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def describe(self, device: torch.device, parallel: str) -> str:
        """The device line of a run's header, e.g. 'cuda:0 x 8 processes (fsdp)'."""
        return f"{device} x {self.world_size} processes ({parallel})" if self.active else str(device)

    def from_main(self, value):
        """Rank 0's `value` on every rank (e.g. a choice each rank made by its own timing)."""
        if self.active:
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over all ranks in place (a no-op in a single process)."""
        if self.active:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
            torch.distributed.all_reduce(tensor, op=ops[op])
        return tensor


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT): nccl on CUDA, gloo on CPU. Each CUDA process takes the
    GPU of its local rank. Without torchrun: one process, the device unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, torch.distributed.DistError) as exc:
            raise GptcliError(_join_failure(exc)) from None
    return Distributed(rank, world, local), device


def _join_failure(exc: Exception) -> str:
    """Why the processes could not connect, and what to do. One known cause: torchrun
    restarting its workers while sharing its rendezvous store with them, where the new
    workers can read the addresses of the old ones (pytorch/pytorch#135712)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"the restarted processes could not connect ({shorten(first, 200)}); torchrun shares its "
                f"rendezvous store with its workers, so a restart can read the old workers' addresses: launch "
                f"torchrun with the environment variable TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return (f"the processes could not connect ({shorten(first, 200)}); check that every node runs the same "
            f"torchrun command (--nnodes, --rdzv-endpoint, --rdzv-id) and can reach the others")
