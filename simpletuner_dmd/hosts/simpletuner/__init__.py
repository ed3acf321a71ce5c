"""The bridge into SimpleTuner's own trainer: every method registered with this plugin is served through SimpleTuner's
distiller interface, with no SimpleTuner file edited.

- ``patch.install()`` applies the take-over points to an installed SimpleTuner (3.1.x) in memory;
- ``distiller.PluginDistiller`` maps SimpleTuner's distiller calls onto the plugin's hooks;
- ``launcher`` runs SimpleTuner's ``train`` module with the patches applied: ``simpletuner-dmd simpletuner-train``
  or ``python -m simpletuner_dmd.hosts.simpletuner``.

Nothing here imports SimpleTuner at import time. See the README section "Using with SimpleTuner".
"""
