"""Teacher ODE pairs: the teacher's guided Euler ODE solutions, generated once, cached on disk and streamed.

A *pair* is ``(noise, condition index, x0, states)``: pure noise ``x_1``, the index of the prompt it was solved for,
the teacher's Euler solution ``x0`` of the flow ODE ``dx/dσ = v`` from σ = 1 to 0, and the ODE's states ``x_{σ_k}``
at every student timestep ``t_k = 1000·σ_k`` (``dmd_denoising_steps``). DMD's regression term (DMD v1's regression
loss) feeds a state to the student at ``t_k`` and regresses its x̂0 onto the pair's ``x0``; a causal student's ODE
initialisation regresses the same pairs. This module is public API for both.

The σ grid is the teacher's ``teacher_steps``-step schedule ``shift·σ / (1 + (shift − 1)·σ)`` of a uniform grid from 1
to 0 (float64, as the families' ``euler_sampler`` builds it), with each student point inserted (or a grid point within
1e-7 snapped onto it), so the states at the student points are the ODE's own states, not interpolations. Each step is
``x ← x + (σ_next − σ)·v(x, 1000·σ)``, accumulated in fp32; the teacher sees ``x`` in the cache's dtype.

Using it::

    spec = ODEPairSpec(teacher_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", prompts=("a cat", "a dog"),
                       shape=(16, 21, 60, 104), count=1024, seed=0, student_steps=(1000, 757, 522),
                       teacher_steps=50, shift=5.0, guidance_scale=3.0, negative_prompt="blurry",
                       dtype="bfloat16")
    pairs = prepare_ode_pairs(spec, guided_teacher, conds, family=family, cache_dir="cache/ode_pairs",
                              accelerator=accelerator)       # generates once; later calls reuse the cache
    for batch in pairs.stream(batch_size=2, seed=0):         # infinite; one shard in memory at a time
        x_k, t_k, target = batch.states[:, k], batch.timesteps[k], batch.x0

``guided_teacher(x_t, t, cond) -> flow`` is the teacher's flow with its CFG already applied (DMD passes the real score:
standard form ``u + s·(c − u)`` on the negative prompt, cond and uncond as one batch); ``conds[i]`` is the batch-1
condition of ``spec.prompts[i]`` (encoded at set-up), and pair ``j`` uses prompt ``j mod len(prompts)``.

The cache (``cache_dir/ode-<key>/``): ``manifest.json``, ``probe.safetensors`` and ``shard-NNNNN.safetensors`` files
of ``shard_size`` pairs (``noise``, ``cond_index``, ``x0``, ``states`` of shape ``(n, K, *shape)``). The folder name is
a hash of everything in ``ODEPairSpec`` (teacher identity, prompts, shape, count, seed, student steps, teacher steps,
shift, guidance, negative prompt, dtype, shard size), so a changed spec generates a new cache and an unchanged one is
reused. The teacher's identity is a caller's string (a model path); to catch a changed teacher behind the same string
(retrained weights, another quantisation), the teacher's flow on one fixed input is stored as the *probe*, and a cache
whose probe differs by more than ``PROBE_TOLERANCE`` (relative L2) is regenerated — checking it costs one teacher
call of batch 1.

Writing is crash-safe and resumable: shards are written one by one (each atomically) into ``.ode-<key>.partial/``,
and only when every shard exists is the manifest written and the folder renamed to its final name. An interrupted
generation leaves no folder under the final name; the next call keeps the partial folder's finished shards (each
shard's noise comes from its own seed, so a shard is the same whoever generates it, and when) and generates the rest.
Under several processes every process generates its share of the shards (shard ``i`` on process ``i mod world``),
then the main process publishes the folder; ``cache_dir`` must be a folder every process sees.

Disk: each pair holds ``K + 2`` latents in the cache's dtype (Wan 2.1 at 480×832×81 in bf16: 4.2 MB per latent, so
1024 pairs with K = 3 take 21 GB). Reading holds one shard (and one batch) in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .atomic import fsync_dir, write_file
from .errors import UserError
from .flow import T_MAX, euler_step
from .processes import from_main

FORMAT = "simpletuner-dmd-ode-pairs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "probe.safetensors"
SPEC = "spec.json"
PROBE_TOLERANCE = 1e-3  # relative L2 distance of the probe above which the teacher counts as changed
PROBE_TIMESTEP = 500.0
SNAP = 1e-7  # a grid σ this close to a student σ is replaced by it

FlowFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """The name ``ODEPairSpec.dtype`` takes for a torch dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"ODE pairs are stored as one of {sorted(_DTYPES)}, not {dtype}")


# --------------------------------------------------------------------------- what is generated


@dataclass(frozen=True)
class ODEGrid:
    """The σ points of the Euler solve (descending from 1 to 0) and, for each student step, its index in them."""

    sigmas: tuple[float, ...]
    state_index: tuple[int, ...]


def ode_grid(teacher_steps: int, shift: float, student_steps: Sequence[int]) -> ODEGrid:
    """The teacher's ``teacher_steps``-step shifted schedule with the student points ``t_k / 1000`` inserted (a grid
    point within ``SNAP`` of one is moved onto it), so the solve passes exactly through every student point."""
    if teacher_steps < 1:
        raise ValueError(f"teacher_steps must be at least 1, got {teacher_steps}")
    base = torch.linspace(1.0, 0.0, teacher_steps + 1, dtype=torch.float64)
    sigmas = (shift * base / (1.0 + (shift - 1.0) * base)).tolist()
    points = [float(t) / T_MAX for t in student_steps]
    for p in points:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"student timesteps must be in (0, 1000], got {list(student_steps)}")
        nearest = min(range(len(sigmas)), key=lambda j: abs(sigmas[j] - p))
        if abs(sigmas[nearest] - p) <= SNAP:
            sigmas[nearest] = p
        else:
            sigmas.append(p)
            sigmas.sort(reverse=True)
    return ODEGrid(tuple(sigmas), tuple(sigmas.index(p) for p in points))


@torch.no_grad()
def solve_ode(teacher: FlowFn, noise: torch.Tensor, cond: Any, grid: ODEGrid, *,
              input_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler on the flow ODE from ``noise`` (σ = 1) over ``grid``: returns ``(x0, states)`` in fp32, ``states`` of
    shape ``(B, K, …)`` holding ``x`` at each student point. ``teacher`` sees ``x`` in ``input_dtype`` (default: the
    noise's dtype); the sum runs in fp32."""
    dtype = input_dtype or noise.dtype
    x = noise.float()
    want = {index: k for k, index in enumerate(grid.state_index)}
    states: list[torch.Tensor | None] = [None] * len(grid.state_index)
    for i, (s, s_next) in enumerate(zip(grid.sigmas[:-1], grid.sigmas[1:])):
        if i in want:
            states[want[i]] = x.clone()
        t = torch.full((x.shape[0],), s * T_MAX, device=x.device)
        x = euler_step(x, teacher(x.to(dtype), t, cond), s, s_next)
    return x, torch.stack(states, dim=1)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ODEPairSpec:
    """Everything that decides the pairs' content; its ``key`` names the cache folder.

    ``teacher_id``: the teacher's identity (a model path or hub id, with whatever else the caller knows: a config or
    a weights' fingerprint); ``prompts``: the texts of the conditions; ``shape``: one sample's latent shape;
    ``count``: the number of pairs; ``seed``: the noise's seed; ``student_steps``: the student timesteps (0..1000,
    decreasing) whose states are stored; ``teacher_steps``, ``shift``: the teacher's Euler schedule;
    ``guidance_scale``, ``negative_prompt``, ``guidance_interval``: the teacher's CFG (standard form, applied at the
    timesteps inside the interval; for the key: the caller's ``teacher`` applies it); ``guidance_scale_2``,
    ``boundary_ratio``: a family with experts (Wan 2.2 A14B) guided with a second scale where its second expert runs
    (``t < boundary_ratio · 1000``), both None otherwise and then left out of the key, so the key of a one-scale
    teacher is what it was before they existed; ``dtype``: the storage dtype (and the teacher's input dtype);
    ``shard_size``: pairs per shard file.
    """

    teacher_id: str
    prompts: tuple[str, ...]
    shape: tuple[int, ...]
    count: int
    seed: int
    student_steps: tuple[int, ...]
    teacher_steps: int = 50
    shift: float = 1.0
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    guidance_interval: tuple[float, float] = (0.0, 1000.0)
    guidance_scale_2: float | None = None
    boundary_ratio: float | None = None
    dtype: str = "float32"
    shard_size: int = 256

    def __post_init__(self) -> None:
        for name in ("prompts", "shape", "student_steps", "guidance_interval"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "student_steps", tuple(int(s) for s in self.student_steps))
        object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        for name in ("guidance_scale_2", "boundary_ratio"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if not self.prompts:
            raise ValueError("ODEPairSpec.prompts: at least one prompt")
        if self.count < 1 or self.shard_size < 1 or not self.shape or min(self.shape) < 1:
            raise ValueError(f"ODEPairSpec: count, shard_size and every shape entry must be at least 1 ({self})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ODEPairSpec.dtype: one of {sorted(_DTYPES)}, got {self.dtype!r}")
        ode_grid(self.teacher_steps, self.shift, self.student_steps)  # raises on bad steps

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("prompts", "shape", "student_steps", "guidance_interval"):
            out[name] = list(out[name])
        for name in ("guidance_scale_2", "boundary_ratio"):  # one scale: the spec (and its key) as before
            if out[name] is None:
                del out[name]
        return out

    @property
    def key(self) -> str:
        text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"ode-{self.key[:24]}"

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def grid(self) -> ODEGrid:
        return ode_grid(self.teacher_steps, self.shift, self.student_steps)

    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2 ** 63)


def shard_noise(spec: ODEPairSpec, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``index``'s noise (in the storage dtype: exactly what the solve starts from) and condition indices."""
    start = index * spec.shard_size
    n = min(spec.shard_size, spec.count - start)
    g = torch.Generator().manual_seed(_shard_seed(spec.seed, index))
    noise = torch.randn((n, *spec.shape), generator=g).to(spec.torch_dtype())
    return noise, torch.arange(start, start + n) % len(spec.prompts)


def probe_flow(spec: ODEPairSpec, teacher: FlowFn, conds: Sequence[Any], device: torch.device | str | None = None
               ) -> torch.Tensor:
    """The teacher's flow on one fixed input (noise from the spec's seed, t = 500, the first condition), fp32 on the
    CPU: the cache's record of which teacher made it."""
    g = torch.Generator().manual_seed(_shard_seed(spec.seed, -1))
    x = torch.randn((1, *spec.shape), generator=g).to(spec.torch_dtype())
    t = torch.full((1,), PROBE_TIMESTEP)
    with torch.no_grad():
        return teacher(x.to(device or "cpu"), t.to(device or "cpu"), conds[0]).float().cpu()


def _probe_matches(stored: torch.Tensor, probe: torch.Tensor) -> bool:
    if stored.shape != probe.shape:
        return False
    return float((stored - probe).norm()) <= PROBE_TOLERANCE * float(probe.norm()) or torch.equal(stored, probe)


# --------------------------------------------------------------------------- generating


def generate_shards(spec: ODEPairSpec, teacher: FlowFn, conds: Sequence[Any], *, family: Any, folder: str | Path,
                    rank: int = 0, world: int = 1, batch_size: int = 8, device: torch.device | str | None = None,
                    progress: bool = True) -> list[int]:
    """Write the missing shards ``i`` with ``i mod world == rank`` into ``folder`` (each atomically); return the
    indices written. ``family.concat_conditions`` batches ``conds``; teacher calls hold ``batch_size`` pairs."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if len(conds) != len(spec.prompts):
        raise ValueError(f"{len(conds)} conditions for {len(spec.prompts)} prompts")
    folder = Path(folder)
    grid = spec.grid()
    dtype = spec.torch_dtype()
    todo = [i for i in range(rank, spec.num_shards, world) if not (folder / shard_name(i)).is_file()]
    total = sum(min(spec.shard_size, spec.count - i * spec.shard_size) for i in todo)
    written = []
    with tqdm(total=total, desc="teacher ODE pairs", unit="pair", disable=not progress or not todo) as bar:
        for index in todo:
            noise, cond_index = shard_noise(spec, index)
            x0s, states = [], []
            for b in range(0, noise.shape[0], batch_size):
                rows = cond_index[b:b + batch_size].tolist()
                cond = family.concat_conditions([conds[i] for i in rows])
                x0, st = solve_ode(teacher, noise[b:b + batch_size].to(device or "cpu"), cond, grid,
                                   input_dtype=dtype)
                x0s.append(x0.to(dtype).cpu())
                states.append(st.to(dtype).cpu())
                bar.update(len(rows))
            tensors = {"noise": noise.contiguous(), "cond_index": cond_index.contiguous(),
                       "x0": torch.cat(x0s).contiguous(), "states": torch.cat(states).contiguous()}
            meta = {"format": FORMAT, "key": spec.key, "shard": str(index)}
            write_file(folder / shard_name(index), lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
            written.append(index)
    return written


def _complete(folder: Path, spec: ODEPairSpec) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text(encoding="utf-8"))
    return (data.get("format") == FORMAT and data.get("version") == FORMAT_VERSION and data.get("key") == spec.key
            and all((folder / s["file"]).is_file() for s in data.get("shards", ())))


def _stored_probe(folder: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    path = folder / PROBE
    return load_file(str(path))["flow"] if path.is_file() else None


def _write_probe(folder: Path, probe: torch.Tensor) -> None:
    from safetensors.torch import save_file

    write_file(folder / PROBE, lambda tmp: save_file({"flow": probe.contiguous()}, tmp))


def _publish(partial: Path, final: Path, spec: ODEPairSpec) -> None:
    shards = []
    for i in range(spec.num_shards):
        if not (partial / shard_name(i)).is_file():
            raise RuntimeError(f"ODE pairs: shard {i} is missing from {partial} after generation")
        shards.append({"file": shard_name(i), "count": min(spec.shard_size, spec.count - i * spec.shard_size)})
    grid = spec.grid()
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "key": spec.key, "spec": spec.to_json(),
                "sigmas": list(grid.sigmas), "state_index": list(grid.state_index), "shards": shards}
    write_file(partial / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    if final.exists():  # an older cache under the same key whose teacher probe no longer matches
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


def prepare_ode_pairs(spec: ODEPairSpec, teacher: FlowFn, conds: Sequence[Any], *, family: Any,
                      cache_dir: str | Path, accelerator: Any = None, batch_size: int = 8,
                      device: torch.device | str | None = None, progress: bool = True,
                      log: Callable[[str], None] | None = print) -> ODEPairs:
    """The pairs of ``spec`` in ``cache_dir``: reused when a complete cache of the same key and the same teacher
    (probe) exists, generated otherwise (resuming a partial one). With an ``accelerator`` every process must call it;
    each generates its share of the shards, the main process publishes, and all return the same ``ODEPairs``; the
    main process's ``spec`` decides (a shape taken from each process's first batch may differ)."""
    spec = from_main(accelerator, spec)
    root = Path(cache_dir)
    final, partial = root / spec.folder_name, root / f".{spec.folder_name}.partial"
    main = accelerator is None or accelerator.is_main_process
    action = None
    if main:
        root.mkdir(parents=True, exist_ok=True)
        probe = probe_flow(spec, teacher, conds, device)
        if _complete(final, spec) and _probe_matches(_stored_probe(final), probe):
            action = "reuse"
        else:
            same = (partial / SPEC).is_file() and json.loads((partial / SPEC).read_text("utf-8")) == spec.to_json()
            stored = _stored_probe(partial) if same else None
            if partial.exists() and (stored is None or not _probe_matches(stored, probe)):
                shutil.rmtree(partial)  # another generation's shards (a changed teacher under the same key)
            partial.mkdir(exist_ok=True)
            write_file(partial / SPEC, lambda tmp: Path(tmp).write_text(json.dumps(spec.to_json()), "utf-8"))
            _write_probe(partial, probe)
            action = "generate"
            if log is not None:
                done = sum((partial / shard_name(i)).is_file() for i in range(spec.num_shards))
                log(f"teacher ODE pairs: generating {spec.count} pairs ({spec.teacher_steps} Euler steps, guidance "
                    f"{spec.guidance_scale:g}"
                    + ("" if spec.guidance_scale_2 is None else f", {spec.guidance_scale_2:g} below boundary_ratio "
                                                                 f"{spec.boundary_ratio:g}")
                    + f") into {final}" + (f" ({done} of {spec.num_shards} shards kept from an "
                                                                 f"interrupted run)" if done else ""))
        if action == "reuse" and log is not None:
            log(f"teacher ODE pairs: reusing {final}")
    action = from_main(accelerator, action)
    if action == "generate":
        rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
        generate_shards(spec, teacher, conds, family=family, folder=partial, rank=rank, world=world,
                        batch_size=batch_size, device=device, progress=progress and main)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main:
            _publish(partial, final, spec)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return ODEPairs.open(final)


# --------------------------------------------------------------------------- reading


@dataclass
class ODEPairBatch:
    """A batch of pairs: ``noise`` and ``x0`` ``(B, *shape)``, ``states`` ``(B, K, *shape)`` (``states[:, k]`` is the
    ODE's state at ``timesteps[k]``), ``cond_index`` ``(B,)`` (into the spec's prompts), in the cache's dtype."""

    noise: torch.Tensor
    cond_index: torch.Tensor
    x0: torch.Tensor
    states: torch.Tensor
    timesteps: tuple[int, ...]

    def __len__(self) -> int:
        return self.noise.shape[0]


@dataclass
class ODEPairs:
    """A complete pair cache (``ODEPairs.open(folder)``): its manifest, and ``stream`` to read it in batches."""

    folder: Path
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> ODEPairs:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder}: not a complete teacher ODE-pair cache (no {MANIFEST}; an interrupted "
                            "generation resumes on the next run)")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise UserError(f"{path}: not a version-{FORMAT_VERSION} teacher ODE-pair manifest")
        missing = [s["file"] for s in manifest["shards"] if not (folder / s["file"]).is_file()]
        if missing:
            raise UserError(f"{folder}: teacher ODE-pair cache lacks {missing[0]} (delete the folder to regenerate)")
        return cls(folder, manifest)

    @property
    def spec(self) -> ODEPairSpec:
        return ODEPairSpec(**self.manifest["spec"])

    @property
    def num_pairs(self) -> int:
        return sum(s["count"] for s in self.manifest["shards"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.manifest["spec"]["student_steps"])

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(self.manifest["spec"]["prompts"])

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index`` as CPU tensors (``noise``, ``cond_index``, ``x0``, ``states``)."""
        from safetensors.torch import load_file

        return load_file(str(self.folder / self.manifest["shards"][index]["file"]))

    def stream(self, batch_size: int, *, seed: int = 0, device: torch.device | str | None = None) -> ODEPairStream:
        """An endless iterator of ``ODEPairBatch`` of ``batch_size`` pairs (``take(n)`` for another size): shards in a
        random order, pairs shuffled inside each, both redrawn every epoch from ``seed``; one shard in memory."""
        return ODEPairStream(self, batch_size, seed=seed, device=device)


class ODEPairStream:
    """Reads an ``ODEPairs`` cache shard by shard, cycling; see ``ODEPairs.stream``. ``epoch`` counts passes started,
    ``shard_loads`` the shards read so far."""

    def __init__(self, pairs: ODEPairs, batch_size: int, *, seed: int = 0, device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pairs, self.batch_size, self.seed, self.device = pairs, batch_size, seed, device
        self.epoch = 0
        self.shard_loads = 0
        self._order: list[int] = []
        self._shard: dict[str, torch.Tensor] | None = None
        self._pos = 0

    def __iter__(self) -> Iterator[ODEPairBatch]:
        return self

    def __next__(self) -> ODEPairBatch:
        return self.take(self.batch_size)

    def _generator(self, *parts: int) -> torch.Generator:
        value = self.seed
        for p in parts:
            value = (value * 1_000_003 + p + 1) % (2 ** 63)
        return torch.Generator().manual_seed(value)

    def _next_shard(self) -> None:
        self._shard = None  # the old one is released before the next is read
        if not self._order:
            self._order = torch.randperm(self.pairs.num_shards, generator=self._generator(self.epoch)).tolist()
            self.epoch += 1
        index = self._order.pop(0)
        shard = self.pairs.load_shard(index)
        perm = torch.randperm(shard["noise"].shape[0], generator=self._generator(self.epoch, index))
        self._shard = {name: value[perm] for name, value in shard.items()}
        self._pos = 0
        self.shard_loads += 1

    def take(self, n: int) -> ODEPairBatch:
        parts: list[dict[str, torch.Tensor]] = []
        need = n
        while need > 0:
            if self._shard is None or self._pos >= self._shard["noise"].shape[0]:
                self._next_shard()
            assert self._shard is not None
            stop = min(self._pos + need, self._shard["noise"].shape[0])
            parts.append({k: v[self._pos:stop].clone() for k, v in self._shard.items()})
            need -= stop - self._pos
            self._pos = stop
        out = {k: torch.cat([p[k] for p in parts]).to(self.device or "cpu") for k in parts[0]}
        return ODEPairBatch(out["noise"], out["cond_index"], out["x0"], out["states"], self.pairs.timesteps)


__all__ = ["ODEGrid", "ODEPairBatch", "ODEPairSpec", "ODEPairStream", "ODEPairs", "PROBE_TOLERANCE", "dtype_name",
           "generate_shards", "ode_grid", "prepare_ode_pairs", "probe_flow", "shard_noise", "solve_ode"]
