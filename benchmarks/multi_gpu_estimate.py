"""How many GPUs does DMD need? ``simpletuner-dmd estimate``'s per-GPU peak for the quickstart's DMD settings (LoRA
rank 128, the fake score an adapter, gradient checkpointing, bf16 compute) on Wan 2.1 1.3B, 14B and Wan 2.2 A14B, at
480×832×81 and 1280×704×121, on 1, 2, 4 and 8 GPUs (FSDP2, and FSDP2 with context parallelism), and the smallest
setup that fits a 24, 40 and 80 GB card. One GPU keeps the quickstart's int8-quanto base; a sharded base is bf16 (FSDP2
cannot shard quanto's int8 tensors). The figures come from the estimate's model of the tensors (``estimate.py``),
divided as FSDP2 and Ulysses divide them; they are not multi-GPU measurements. Each cell is what a GPU must hold at
some point (``Estimate.need_gib``): the step's peak, or set-up's where the reference host's loading of the whole base
onto each GPU before sharding it weighs more.

    python -m benchmarks.multi_gpu_estimate          # prints the markdown tables, writes the JSON beside the others
"""

from __future__ import annotations

import json
from pathlib import Path

from simpletuner_dmd.estimate import Parallel, estimate, layout_for, parallel_problems, setups, smallest_fitting
from simpletuner_dmd.hosts.reference.run_config import load_config
from simpletuner_dmd.plugins import get_plugin_manager

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "config_examples" / "wan-dmd-quickstart" / "config.json"
OUT = REPO / "benchmarks" / "results" / "multi_gpu_estimate.json"
MODELS = {  # label -> (model_family, hub id whose published config the family knows)
    "Wan 2.1 1.3B": ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "Wan 2.1 14B": ("wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    "Wan 2.2 A14B": ("wan2.2", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
}
SIZES = {"480×832×81": (832, 480, 81), "1280×704×121": (1280, 704, 121)}
CARDS = {"24 GB": 22.5, "40 GB": 39.5, "80 GB": 79.6}  # usable GiB
GPUS = (1, 2, 4, 8)


def rows() -> dict:
    pm = get_plugin_manager()
    result: dict = {"cards_usable_gib": CARDS, "models": {}}
    for label, (family_name, hub_id) in MODELS.items():
        raw = json.loads(QUICKSTART.read_text())
        raw.update(model_family=family_name, pretrained_model_name_or_path=hub_id)
        path = REPO / "work" / "multi_gpu_estimate_config.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(raw))
        rc = load_config(path, pm, check_paths=False)
        family = rc.family_cls(autocast_dtype=None)
        config = dict(family.published_configs[hub_id])
        for size, (width, height, frames) in SIZES.items():
            plan = rc.method_cls.memory_plan(rc.method_config, rc.host, layout_for(family, frames))
            shape = family.activation_shape(config, width=width, height=height, frames=frames)

            def run(parallel: Parallel, host: dict, *, width=width, height=height, frames=frames, plan=plan):
                return estimate(family=family, config=config, host=host, method_plan=plan, width=width,
                                height=height, frames=frames, parallel=parallel)

            bf16 = {**rc.host, "base_model_precision": "no_change"}
            peaks = {}
            for gpus in GPUS:
                for parallel in setups(gpus):
                    host = bf16 if parallel.fsdp else rc.host
                    if parallel_problems(parallel, config, shape, host):
                        continue
                    peaks[parallel.describe()] = round(run(parallel, host).need_gib, 1)
            fits = {}
            for card, gib in CARDS.items():
                found = smallest_fitting(gib, run, rc.host, config, shape, counts=GPUS)
                fits[card] = None if found is None else {"setup": found[0].describe(),
                                                         "gib": round(found[1].need_gib, 1)}
            result["models"].setdefault(label, {})[size] = {"tokens": shape["tokens"], "peak_gib": peaks,
                                                            "smallest_fitting": fits}
    return result


def markdown(result: dict) -> str:
    lines = []
    setups_seen = list(dict.fromkeys(k for m in result["models"].values() for s in m.values() for k in s["peak_gib"]))
    lines.append("| model | sample | " + " | ".join(setups_seen) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in setups_seen) + " |")
    for label, sizes in result["models"].items():
        for size, row in sizes.items():
            cells = [f"{row['peak_gib'][k]:.1f}" if k in row["peak_gib"] else "—" for k in setups_seen]
            lines.append(f"| {label} | {size} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| model | sample | " + " | ".join(f"{card} card" for card in result["cards_usable_gib"]) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in result["cards_usable_gib"]) + " |")
    for label, sizes in result["models"].items():
        for size, row in sizes.items():
            cells = [f"{f['setup']} ({f['gib']:.1f})" if f else "not with up to 8 GPUs"
                     for f in row["smallest_fitting"].values()]
            lines.append(f"| {label} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    result = rows()
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\n(written to {OUT.relative_to(REPO)})")


if __name__ == "__main__":
    main()
