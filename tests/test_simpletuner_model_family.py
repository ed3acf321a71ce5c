"""The family that drives SimpleTuner's own model object (``hosts/simpletuner/model_family.py``), against a stand-in of
that object: what reaches ``model_predict``, the flow direction, CFG's unconditional half, and which family the bridge
picks. The real thing, through ``simpletuner train``: ``tests/simpletuner/test_model_families.py``."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.families.sd3 import SD3Family
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.flow import guided
from simpletuner_dmd.hosts.simpletuner.distiller import as_condition, map_tensors, simpletuner_family_class
from simpletuner_dmd.hosts.simpletuner.model_family import PER_CALL, SimpleTunerCondition, SimpleTunerModelFamily
from simpletuner_dmd.networks import guided_batch
from simpletuner_dmd.plugins import get_plugin_manager


class Net(torch.nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, noisy, t, text, image):
        return self.scale * (noisy * (t / 1000).view(-1, *[1] * (noisy.ndim - 1)) + text.mean() + image.view(
            image.shape[0], *[1] * (noisy.ndim - 1)))


class StandIn:
    """SimpleTuner's model object as the family uses it: ``model``, ``model_predict``, ``prediction_to_noiseward_flow``
    (this one predicts data-ward, as a family whose target points the other way), ``collate_prompt_embeds``."""

    def __init__(self):
        self.model = Net()
        self.calls: list[dict] = []

    def get_trained_component(self, unwrap_model: bool = True):
        return self.model

    def model_predict(self, batch):
        self.calls.append({**batch, "network": self.model})
        assert batch["latents"].shape[0] == batch["noisy_latents"].shape[0]
        image = batch["image_embeds"] if "image_embeds" in batch else torch.zeros(batch["noisy_latents"].shape[0])
        return {"model_prediction": -self.model(batch["noisy_latents"], batch["timesteps"],
                                                batch["encoder_hidden_states"], image)}

    def prediction_to_noiseward_flow(self, prediction):
        return -prediction

    def collate_prompt_embeds(self, outputs):
        return {}


def family() -> tuple[SimpleTunerModelFamily, StandIn]:
    model = StandIn()
    fam = SimpleTunerModelFamily()
    fam.bind_simpletuner_model(model)
    return fam, model


def prepared(batch_size: int = 2, image: bool = True) -> dict:
    shape = (batch_size, 4, 8, 8) if image else (batch_size, 4, 3, 8, 8)
    return {"latents": torch.randn(shape), "noisy_latents": torch.randn(shape), "noise": torch.randn(shape),
            "timesteps": torch.full((batch_size,), 500.0), "sigmas": torch.full((batch_size,), 0.5),
            "encoder_hidden_states": torch.randn(batch_size, 5, 6), "prompt_embeds": torch.randn(batch_size, 5, 6),
            "add_text_embeds": torch.randn(batch_size, 3), "image_embeds": torch.arange(batch_size).float() + 1,
            "added_cond_kwargs": {"text_embeds": torch.randn(batch_size, 3)}, "prompts": ["a", "b"][:batch_size],
            "conditioning_type": "image"}


def test_the_batch_is_the_condition_less_the_call():
    fam, _ = family()
    batch = prepared()
    latents, cond = fam.from_simpletuner_batch(batch)
    assert latents.shape == (2, 4, 1, 8, 8) and torch.equal(latents[:, :, 0], batch["latents"])
    assert cond.images and cond.rows == 2 and not cond.text_only
    assert not set(cond.entries) & PER_CALL
    assert cond.entries["latents"] is batch["latents"]  # the clean latents travel (Wan I2V's first frame)
    video, vcond = fam.from_simpletuner_batch(prepared(image=False))
    assert video.shape == (2, 4, 3, 8, 8) and not vcond.images


@pytest.mark.parametrize("image", [True, False])
def test_a_network_call_is_model_predict_on_the_condition(image):
    fam, model = family()
    batch = prepared(image=image)
    latents, cond = fam.from_simpletuner_batch(batch)
    x_t, t = torch.randn_like(latents), torch.tensor([250.0, 750.0])
    flow = fam.predict_flow(model.model, x_t, t, cond)
    call = model.calls[-1]
    x = x_t[:, :, 0] if image else x_t
    assert torch.equal(call["noisy_latents"], x) and torch.equal(call["timesteps"], t)
    assert torch.allclose(call["sigmas"], t / 1000) and call["latents"] is batch["latents"]
    # the stand-in predicts data-ward; the family returns the noise-ward flow, with the frame axis
    expected = model.model(x, t, batch["encoder_hidden_states"], batch["image_embeds"])
    assert flow.shape == x_t.shape and torch.allclose(flow[:, :, 0] if image else flow, expected)


def test_cfgs_unconditional_half_keeps_the_image_and_swaps_the_text():
    fam, model = family()
    latents, cond = fam.from_simpletuner_batch(prepared())
    negative = {"prompt_embeds": torch.full((5, 6), 7.0), "pooled_prompt_embeds": torch.full((3,), 7.0),
                "attention_masks": torch.ones(5)}
    uncond = as_condition(negative, fam)
    assert uncond.text_only and uncond.rows == 1
    assert uncond.entries["encoder_hidden_states"].shape == (1, 5, 6)
    assert uncond.entries["add_text_embeds"].shape == (1, 3) and uncond.entries["encoder_attention_mask"].shape == (1, 5)
    t = torch.tensor([300.0, 600.0])
    out = guided_batch(fam, lambda x, tt, c: fam.predict_flow(model.model, x, tt, c), latents, t, cond, uncond,
                       lambda c, u: guided(c, u, 3.0))
    call = model.calls[-1]
    assert call["noisy_latents"].shape[0] == 4 and call["latents"].shape[0] == 4
    assert torch.equal(call["image_embeds"], torch.tensor([1.0, 2.0, 1.0, 2.0]))  # the image stays with its sample
    assert torch.equal(call["encoder_hidden_states"][2:], torch.full((2, 5, 6), 7.0))
    assert torch.equal(call["encoder_hidden_states"][:2], cond.entries["encoder_hidden_states"])
    assert torch.equal(call["added_cond_kwargs"]["text_embeds"][2:], torch.full((2, 3), 7.0))
    assert call["prompts"] == ["a", "b"] and call["conditioning_type"] == "image"
    assert out.shape == latents.shape


def test_a_separate_network_is_called_in_place_of_simpletuners_and_put_back():
    fam, model = family()
    latents, cond = fam.from_simpletuner_batch(prepared())
    other = Net(scale=2.0)
    t = torch.tensor([400.0, 400.0])
    a = fam.predict_flow(model.model, latents, t, cond)
    b = fam.predict_flow(other, latents, t, cond)
    assert model.calls[-1]["network"] is other and model.model is not other
    assert torch.allclose(b, 2 * a)


def test_conditions_move_to_a_device_whole():
    fam, _ = family()
    _, cond = fam.from_simpletuner_batch(prepared())
    moved = map_tensors(cond, lambda t: t.double())
    assert isinstance(moved, SimpleTunerCondition) and moved.rows == 2 and moved.images
    assert moved.entries["latents"].dtype == torch.float64
    assert moved.entries["added_cond_kwargs"]["text_embeds"].dtype == torch.float64


@pytest.mark.parametrize("st_family, flavour, expected", [
    ("flux", "dev", SimpleTunerModelFamily),  # nobody declares it, no family of that name: SimpleTuner's own model
    ("qwen_image", "v1.0", SimpleTunerModelFamily),
    ("ltxvideo", "0.9.0", SimpleTunerModelFamily),
    ("wan", "i2v-14b-2.1", SimpleTunerModelFamily),  # the plugin's wan family is text-to-video
    ("wan", "t2v-480p-1.3b-2.1", WanFamily),
    ("sd3", "medium", SD3Family),
])
def test_the_bridge_serves_every_other_family_through_simpletuners_model(st_family, flavour, expected):
    assert simpletuner_family_class(get_plugin_manager(entry_points=False), st_family, flavour) is expected


def test_the_reference_host_refuses_the_family_by_name():
    problems = SimpleTunerModelFamily.config_problems({})
    assert len(problems) == 1 and "inside SimpleTuner only" in problems[0]


def test_a_family_that_is_not_flow_matching_goes_back_to_simpletuner_or_is_refused(monkeypatch):
    """SDXL predicts ε: a method name SimpleTuner has (lcm) is handed back to SimpleTuner's own distiller — taken out of
    the list every take-over point reads — and a name only the plugin serves (ode_init) is one problem naming the
    families the plugin serves. Flow-matching families, and families SimpleTuner's registry does not describe, stay."""
    from simpletuner_dmd.hosts.simpletuner import preflight

    kinds = {"sdxl": "epsilon", "flux": "flow_matching", "wan": "flow_matching", "qwen_image": "flow_matching"}
    monkeypatch.setattr(preflight, "simpletuner_prediction_types", lambda: kinds)
    monkeypatch.setattr(preflight, "simpletuner_own_methods", lambda: {"lcm", "dmd", "dcm", "perflow"})
    served = ["dcm", "dmd", "lcm", "ode_init"]

    note = preflight.hand_back({"model_family": "sdxl", "distillation_method": "LCM"}, served)
    assert note == ("model_family sdxl predicts epsilon: distillation_method lcm is SimpleTuner's own here "
                    "(simpletuner-dmd serves flow-matching families)")
    assert served == ["dcm", "dmd", "ode_init"]

    refused, note = preflight.not_flow_matching({"model_family": "sdxl"}, "ode_init")
    assert note is None and refused == ("model_family sdxl: SimpleTuner's sdxl predicts epsilon; distillation_method "
                                        "ode_init (simpletuner-dmd) serves the flow-matching families: flux, "
                                        "qwen_image, wan")
    problems, _ = preflight.plugin_problems({"model_family": "sdxl", "distillation_method": "ode_init"}, "ode_init",
                                            get_plugin_manager(entry_points=False))
    assert problems == [refused]
    for family in ("flux", "wan", "some_new_family"):
        assert preflight.not_flow_matching({"model_family": family}, "dmd") == (None, None)
        assert preflight.hand_back({"model_family": family, "distillation_method": "dmd"}, served) is None
    assert served == ["dcm", "dmd", "ode_init"]
