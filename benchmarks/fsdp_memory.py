"""Each process's peak RSS with the frozen base sharded by the reference host's FSDP2 (``hosts/reference/fsdp.py``)
against one process holding it whole, side by side in one run, on CPU processes (gloo).

A Wan transformer of ``--layers`` blocks at Wan 2.1 1.3B's width (1536, 12 heads, FFN 8960; fp32 on the CPU), frozen,
with the student's and the fake score's LoRA (rank 16) on it, runs one student forward+backward and one fake-score
forward+backward on a small latent, through ``ShardedNetwork`` when sharded. Each process reports the bytes of the
base it holds (its shards), its RSS before the model was built (torch itself), after the passes (the steady state of
training) and its peak RSS (``ru_maxrss``). The peak is set-up's: each process builds the whole base before sharding
it (as the reference host loads it), so sharding divides the steady state, not the set-up peak.

    python -m benchmarks.fsdp_memory                 # launches 1 and 2 processes, prints a table, writes the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fsdp_memory.json"


def _rss_mib() -> float:
    """The process's peak RSS so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mib() -> float:
    """The process's RSS now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def worker(layers: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from simpletuner_dmd.adapters import AdapterSwitch
    from simpletuner_dmd.hosts.reference.fsdp import shard_frozen_base

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _current_mib()
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=layers, rope_max_seq_len=1024)
    model.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    for name in ("student", "fake_score"):
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets), adapter_name=name)
    model.set_adapter("student")
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.requires_grad_(True)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if world > 1:
        class Acc:  # what shard_frozen_base reads of an accelerator
            device = torch.device("cpu")
            num_processes = world
        call = shard_frozen_base(model, Acc())
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    else:
        call, held = model, base_bytes
    switch = AdapterSwitch(model)
    x = torch.randn(1, 16, 2, 16, 16)
    t = torch.tensor([500.0])
    cond = torch.randn(1, 32, 4096)
    for adapter in ("student", "fake_score"):
        with switch.use(adapter):
            out_ = call(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            out_.square().mean().backward()
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the RSS is what is alive (the full base's
    # tensors, freed once sharded, may otherwise stay counted in glibc's arenas)
    result = {"rank": rank, "world": world, "layers": layers, "rss_before_model_mib": before,
              "peak_rss_mib": _rss_mib(), "rss_after_passes_mib": _current_mib(), "base_mib": base_bytes / 2 ** 20,
              "base_held_mib": held / 2 ** 20}
    (out / f"rank{rank}-of-{world}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worker", type=Path, default=None)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.layers, args.worker)
        return
    scratch = REPO / "work" / "fsdp_memory"
    scratch.mkdir(parents=True, exist_ok=True)
    for f in scratch.glob("*.json"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    me = [str(Path(__file__).resolve()), "--layers", str(args.layers), "--worker", str(scratch)]
    subprocess.run([sys.executable, *me], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
                    *me], env=env, check=True)
    rows = [json.loads(p.read_text()) for p in sorted(scratch.glob("*.json"))]
    single = next(r for r in rows if r["world"] == 1)
    print("| processes | rank | base held (MiB) | peak RSS (MiB) | RSS after the passes (MiB) | the same less torch's "
          "own (MiB) | ratio to 1 process |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["world"], r["rank"])):
        net = r["rss_after_passes_mib"] - r["rss_before_model_mib"]
        ratio = net / (single["rss_after_passes_mib"] - single["rss_before_model_mib"])
        print(f"| {r['world']} | {r['rank']} | {r['base_held_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_after_passes_mib']:.0f} | {net:.0f} | {ratio:.2f} |")
    OUT.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
