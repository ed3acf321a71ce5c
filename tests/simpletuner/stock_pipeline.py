"""The student of a ``simpletuner train`` run in the family's *stock* diffusers pipeline, run by the SimpleTuner venv's
python (its diffusers): the base pipeline folder, the LoRA SimpleTuner exported to ``output_dir`` and the scheduler the
bridge wrote to ``output_dir/scheduler``, sampled as SimpleTuner's validation sampled it — the same prompt, size,
steps and guidance, ``generator=`` seeded with the validation seed for the initial noise and the scheduler's own
``generator`` seeded alike for its re-noising (stock pipelines pass none to ``scheduler.step``).

    <venv>/bin/python tests/simpletuner/stock_pipeline.py FAMILY BASE OUTPUT_DIR RESULT.json --prompt P --seed S
        --size WxH --steps N --guidance G [--frames F] [--image FIRST_FRAME.png]

``--simpletuner-wan-attention`` (a diagnostic, not what users run): SimpleTuner 4.10.1's own Wan attention processor
in the stock transformer's cross-attention, which splits an I2V context at a fixed 513 image tokens where diffusers
takes all but the last 512 (the text's) — the one difference between SimpleTuner's Wan transformer and diffusers'.

FAMILY is a key of ``PIPELINES`` (flux, qwen_image, ltxvideo, wan-i2v). It writes, beside RESULT.json, ``seeded.npy``
(the pipeline's float output in [0, 1], before any 8-bit quantisation) and ``seeded.png`` (its first frame, quantised
as diffusers' ``numpy_to_pil`` does), the same once more with the scheduler's re-noising left to torch's global RNG
(``global-rng.*``, which no one can reproduce), and RESULT.json: the pipeline and scheduler classes, the LoRA keys
loaded, the timesteps, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# family -> (diffusers pipeline class, its keyword for the guidance SimpleTuner's validation_guidance becomes)
PIPELINES = {
    "flux": ("FluxPipeline", "guidance_scale"),
    "qwen_image": ("QwenImagePipeline", "true_cfg_scale"),
    "ltxvideo": ("LTXPipeline", "guidance_scale"),
    "wan-i2v": ("WanImageToVideoPipeline", "guidance_scale"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=sorted(PIPELINES))
    parser.add_argument("base")
    parser.add_argument("output_dir")
    parser.add_argument("result")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--simpletuner-wan-attention", action="store_true",
                        help="diagnostic: SimpleTuner 4.10.1's WanAttnProcessor2_0 in every cross-attention (it "
                             "takes a fixed 513 tokens of the context as the image's, diffusers' all but the last 512)")
    args = parser.parse_args(argv)

    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler

    start = time.monotonic()
    pipeline_name, guidance_key = PIPELINES[args.family]
    pipe = getattr(diffusers, pipeline_name).from_pretrained(args.base, torch_dtype=torch.float32)
    pipe.load_lora_weights(args.output_dir, weight_name="pytorch_lora_weights.safetensors")
    pipe.scheduler = FewStepFlowScheduler.from_pretrained(args.output_dir, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    if args.simpletuner_wan_attention:
        from simpletuner.helpers.models.wan.transformer import WanAttnProcessor2_0

        for block in pipe.transformer.blocks:
            block.attn2.set_processor(WanAttnProcessor2_0())
    width, height = (int(v) for v in args.size.split("x"))
    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps, output_type="np",
                **{guidance_key: args.guidance})
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    if args.frames is not None:
        call["num_frames"] = args.frames
    if args.image is not None:
        call["image"] = Image.open(args.image).convert("RGB")

    out = Path(args.result).parent
    result = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
              "timesteps": [float(t) for t in pipe.scheduler.timesteps],
              "lora_adapters": sorted(pipe.transformer.peft_config)}
    for name, seeded in (("seeded", True), ("global-rng", False)):
        pipe.scheduler.generator = torch.Generator().manual_seed(args.seed) if seeded else None
        torch.manual_seed(args.seed + 1)  # the global RNG: a value SimpleTuner's validation has no reason to share
        output = pipe(**call, generator=torch.Generator().manual_seed(args.seed))
        array = np.asarray(output.frames if hasattr(output, "frames") else output.images, dtype=np.float32)
        np.save(out / f"{name}.npy", array)
        first = array[0] if array.ndim == 4 else array[0, 0]  # (B, H, W, C) images, (B, F, H, W, C) videos
        diffusers.utils.numpy_to_pil(first[None])[0].save(out / f"{name}.png")
        result[f"{name}_shape"] = list(array.shape)
    result["seconds"] = round(time.monotonic() - start, 1)
    Path(args.result).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
