"""The model card's text (``README.md`` of an export), as ``string.Template`` pieces that ``export.model_card`` fills.

``CARD`` is the whole card; each ``$name`` in it is a value computed from the run or one of the named pieces below,
filled (or left empty) by the case it covers: the schedule when the method has a scheduler, the block-by-block section
for a block-causal student, the pipeline call of an image or a video pipeline, the ComfyUI section with one
original-layout file, one per part, or none, the validation sample, the last step's figures and the EMA note. A piece
that is present ends with its own newline(s); an absent one is the empty string.
"""

from __future__ import annotations

from string import Template

CARD = Template("""\
---
base_model: $base_json
library_name: diffusers
license: other
pipeline_tag: $pipeline_tag
tags:
$tags
---

# $title

Trained with [simpletuner-dmd](https://pypi.org/project/simpletuner-dmd/) from `$base` ($steps optimizer steps\
$method_clause).

$own_model$sampling$streaming$diffusers$comfyui$sample$training""")

# ---------------------------------------------------------------------------- distilled from the user's own LoRAs

OWN_MODEL = Template("""\
## Distilled from your model

The teacher was `$base` with these LoRAs merged into it (`teacher_loras`):

$loras
So this student LoRA is trained *on top of* them: use it together with the same LoRAs at the same scales, or use \
`combined/` alone on the stock base — one LoRA holding those LoRAs (times their scales) and the student, concatenated \
by rank so that its sum is exact$combined_original. Do not load `combined/` together with your LoRAs (they would \
count twice).

""")

OWN_LORA = Template("- `$path`, scale $scale$into\n")

COMBINED_ORIGINAL = Template(" (original layout: $files)")

# ---------------------------------------------------------------------------- the schedule (a method with a scheduler)

SAMPLING = Template("""\
## Sampling settings

| setting | value |
| --- | --- |
| steps | $steps_cell |
| timesteps | $timesteps |
| σ list | $sigmas |
| shift | none: the σ list above is explicit (σ = t / 1000); a scheduler's shift must not be applied on top |
| step rule | $step_rule |
| guidance | 1 (CFG off: the teacher's guidance is distilled into the student) |
| LoRA strength | 1.0 |
$x0_rule
$usage_notes""")

X0_RULE = Template("""\
| x̂0 rule | LCM's boundary scalings at timestep_scaling $scaling (c_skip ≤ $c_skip at these timesteps) |
""")

USAGE_NOTE = Template("""\
$note

""")

STEP_RULES = {"x0_renoise": "predict x̂0, then re-noise to the next σ with fresh noise (the last step returns x̂0)",
              "euler": "one Euler step of the flow ODE from each σ to the next"}

STEPS_ANY_COUNT = Template("$count (or any count from 1 to $most: the scheduler picks the points as the method's own "
                           "sampler does)")
STEPS_FIXED = Template("$count (no other count: the student was trained for these)")

# ---------------------------------------------------------------------------- a block-causal student

STREAMING = Template("""\
## Run it block by block (block-causal student)

This student was trained block-causally (family `$family`): it generates the video block by block, each block \
attending to the blocks before it through a KV cache. A stock pipeline runs the network bidirectionally (every frame \
attending to every frame), which is not how this student was trained: its samples there are not this student's. \
Stream it instead (frames are written as each block is done; `--frames` may exceed the training length):

```bash
simpletuner-dmd sample --base $base_json --student path/to/this/folder \\
    --prompt $prompt_json --out samples/
```

| streaming setting | value |
| --- | --- |
| timesteps per block | $timesteps |
| latent frames per block | $frames_per_block |
| context written to the KV cache at timestep | $context_noise |
| KV cache window (latent frames) | $window |

""")

FIRST_FRAME_ALONE = " (the first frame alone)"

# ---------------------------------------------------------------------------- diffusers

DIFFUSERS = Template("""\
## Use it in diffusers

```python
import torch
from diffusers import $pipeline_class
$scheduler_import
pipe = $pipeline_class.from_pretrained($base_json)
$loading
$scheduler_load$call
```

$generator_note""")

SCHEDULER_IMPORT = "from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler\n"
SCHEDULER_LOAD = 'pipe.scheduler = FewStepFlowScheduler.from_pretrained("path/to/this/folder", subfolder="scheduler")\n'
GENERATOR_NOTE = ("Stock pipelines pass no generator to the scheduler's fresh noise: set `pipe.scheduler.generator = "
                  "torch.Generator().manual_seed(…)` to make a sample reproducible.\n\n")

# The pipeline call's arguments, one line each ($steps_args: the scheduler's count and guidance 1, when it has one;
# $max_sequence_length: a base trained with shorter prompts must be run with them).
CALL_ARGS = Template("""\
    prompt=$prompt_json,
$steps_args    width=$width, height=$height,
$max_sequence_length""")
STEPS_ARGS = Template("""\
    num_inference_steps=$steps,
    guidance_scale=1.0,
$guidance_2""")
# A family with experts (its ``expert_guidance``): the stock pipeline's second expert's scale, off too.
GUIDANCE_2 = "    guidance_scale_2=1.0,\n"
MAX_SEQUENCE_LENGTH = Template("    max_sequence_length=$length,\n")
# An image-to-video family's first frame (the family's ``clip_condition``), named like the run's validation_image.
FIRST_FRAME_ARG = Template("    image=load_image($image_json),\n")
FIRST_FRAME_IMPORT = "from diffusers.utils import load_image\n"

# An image pipeline returns ``images``; a video pipeline (the family's ``video``) takes ``num_frames`` (its default is
# 81) and returns ``frames`` even for one frame.
CALL_IMAGE = Template("""\
image = pipe(
$args).images[0]  # a PIL image""")
CALL_ONE_FRAME = Template("""\
image = pipe(
$args    num_frames=1,
    output_type="pil",
).frames[0][0]  # a PIL image: the one frame of the first (and only) video""")
CALL_VIDEO = Template("""\
frames = pipe(
$args    num_frames=$frames,
).frames[0]  # ({frames}, H, W, 3) floats in [0, 1]; \
diffusers.utils.export_to_video(frames, "student.mp4", fps=16) writes them as a video""")

# ---------------------------------------------------------------------------- ComfyUI

COMFYUI = Template("""\
## Use it in ComfyUI

$body""")

COMFYUI_ONE_FILE = Template("""\
Load `$file` (the original key layout of the model's own code) with *LoraLoaderModelOnly*, strength 1.0.
$sampler$notes
(This layout is the one diffusers converts on load, which the tests check; ComfyUI itself was not run where this was \
made.)

""")

COMFYUI_PER_PART = Template("""\
The original key layout of the model's own code comes as one file per part of the model; load each with its own \
*LoraLoaderModelOnly* on the model it names (strength 1.0 each): $files.
$sampler$notes
(This layout is the one diffusers converts on load, which the tests check; ComfyUI itself was not run where this was \
made.)

""")

COMFYUI_SAMPLER = Template("""\
Sample with *SamplerCustom*: sampler `$sampler` (its step is this student's step rule), cfg 1.0, and the σ list above \
as the sigmas (a manual-sigmas node), so that no shift or scheduler reshapes it.
""")

# a family's card note (``card_notes``): one paragraph each
COMFYUI_NOTE = Template("""\

$note
""")

COMFYUI_NONE = """\
No original-layout file was written for this student (see the training log).

"""

# ---------------------------------------------------------------------------- the validation sample

SAMPLE = Template("""\
## Validation sample

![validation sample]($path)

$prompt_line, seed $seed.

""")

# ---------------------------------------------------------------------------- the training

TRAINING = Template("""\
## Training

| setting | value |
| --- | --- |
| family | $family |
| model_type | $model_type |
| LoRA rank / alpha | $rank / $alpha |
| optimizer steps | $steps |
| learning rate | $learning_rate |
| batch size × accumulation | $batch_size × $accumulation |
$method_rows$last_logs$ema_note""")

ROW = Template("| $key | $value |\n")

LAST_LOGS = Template("""\

Last step's figures:

| metric | value |
| --- | --- |
$rows""")

EMA_NOTE = """
`ema/` holds the EMA weights in both layouts.
"""
