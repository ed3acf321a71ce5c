"""Which of the plugin's families the SimpleTuner bridge picks for SimpleTuner's ``(model_family, model_flavour)``,
and how a family turns SimpleTuner's batch and text encoding into its latents and condition. Project environment
only: SimpleTuner is not imported (the real thing: ``test_simpletuner_host.py``)."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.errors import PluginError
from simpletuner_dmd.families.sd3 import SD3Family, unpack_condition
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.families.wan_ti2v import WanTI2VFamily
from simpletuner_dmd.hookspecs import hookimpl
from simpletuner_dmd.hosts.simpletuner.distiller import as_condition, from_simpletuner_batch, simpletuner_family_class
from simpletuner_dmd.plugins import get_plugin_manager


@pytest.mark.parametrize("st_family, flavour, expected", [
    ("wan", None, WanFamily),  # nobody declares it: the family of the same name
    ("wan", "t2v-480p-1.3b-2.1", WanFamily),
    ("wan", "ti2v-5b-2.2", WanTI2VFamily),  # declared for that flavour
    ("sd3", "medium", SD3Family),  # declared for every flavour
    ("sd3", "large", SD3Family),
    ("sd3", None, SD3Family),
])
def test_simpletuner_names_pick_the_family(st_family, flavour, expected):
    assert simpletuner_family_class(get_plugin_manager(entry_points=False), st_family, flavour) is expected


def test_two_families_serving_every_simpletuner_model_are_refused():
    from simpletuner_dmd.hosts.simpletuner.model_family import SimpleTunerModelFamily

    class Another(SimpleTunerModelFamily):
        name = "another-generic"

    class Plugin:
        @hookimpl
        def register_model_families(self, register):
            register(Another)

    pm = get_plugin_manager(entry_points=False, extra=[Plugin()])
    with pytest.raises(PluginError, match="several families serve every SimpleTuner model family.*another-generic"):
        simpletuner_family_class(pm, "flux", "dev")


def test_a_declaration_is_not_inherited_and_two_claims_are_refused():
    class Inherits(SD3Family):  # inherits simpletuner_names but does not declare it: claims nothing
        name = "sd3-inherits"

    class Claims(SD3Family):
        name = "sd3-claims"
        simpletuner_names = (("sd3", None),)

    class Plugin:
        def __init__(self, *classes):
            self.classes = classes

        @hookimpl
        def register_model_families(self, register):
            for cls in self.classes:
                register(cls)

    pm = get_plugin_manager(entry_points=False, extra=[Plugin(Inherits)])
    assert simpletuner_family_class(pm, "sd3", "medium") is SD3Family
    pm = get_plugin_manager(entry_points=False, extra=[Plugin(Claims)])
    with pytest.raises(PluginError, match="claimed by several families: sd3 .*sd3-claims"):
        simpletuner_family_class(pm, "sd3", "medium")


def test_wan_batches_and_text_pass_as_they_are():
    latents, embeds = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 8, 32)
    got = from_simpletuner_batch(WanFamily(), {"latents": latents, "encoder_hidden_states": embeds})
    assert got[0] is latents and got[1] is embeds
    encoded = {"prompt_embeds": embeds[:1], "attention_masks": torch.ones(1, 8)}
    assert torch.equal(as_condition(encoded, WanTI2VFamily), embeds[:1])
    assert torch.equal(as_condition({"prompt_embeds": embeds[0]}, WanFamily), embeds[:1])


def test_sd3_packs_simpletuners_two_text_tensors_and_adds_the_frame_axis():
    """SimpleTuner's sd3 batch: latents (B, 16, h, w), ``encoder_hidden_states`` (B, 77 + L, D) and the pooled
    ``add_text_embeds`` (B, P); its ``encode_text_batch`` for one text gives ``prompt_embeds`` (1, S, D) and the pooled
    one squeezed to (P,)."""
    latents, embeds, pooled = torch.randn(2, 16, 8, 8), torch.randn(2, 231, 48), torch.randn(2, 40)
    x, cond = from_simpletuner_batch(SD3Family(), {"latents": latents, "encoder_hidden_states": embeds,
                                                   "add_text_embeds": pooled})
    assert x.shape == (2, 16, 1, 8, 8) and torch.equal(x[:, :, 0], latents)
    assert cond.shape == (2, 232, 48)
    got_embeds, got_pooled = unpack_condition(cond, 40)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_pooled, pooled)
    assert torch.equal(cond[:, 0, 40:], torch.zeros(2, 8))
    negative = as_condition({"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[0]}, SD3Family)
    assert torch.equal(negative, cond[:1])
