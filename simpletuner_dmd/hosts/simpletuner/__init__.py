"""The bridge into SimpleTuner's own trainer: every method registered with this plugin is served through SimpleTuner's
distiller interface, with no SimpleTuner file edited.

- ``patch.install()`` applies the take-over points to an installed SimpleTuner (3.1.x, 4.x) in memory;
- ``distiller.PluginDistiller`` maps SimpleTuner's distiller calls onto the plugin's hooks;
- ``autoload.apply()`` is what the import hook (``simpletuner_dmd_autoload``, run from a ``.pth`` file at interpreter
  start) calls once SimpleTuner's trainer module is imported: this is how ``simpletuner train`` serves the methods;
- ``autoload.apply_cli()`` makes ``simpletuner train`` itself check the config before it launches anything;
- ``preflight`` holds those checks (also run right after SimpleTuner parses its config, and by ``simpletuner-dmd
  validate-config --host simpletuner``);
- ``launcher`` runs SimpleTuner's ``train`` module with the patches applied, in one process: ``simpletuner-dmd
  simpletuner-train`` or ``python -m simpletuner_dmd.hosts.simpletuner``;
- ``shared`` holds the names they all use, so the modules import one way:
  ``shared <- distiller <- preflight <- patch <- autoload <- launcher``.
- ``tiny_models`` builds tiny random pipelines of SimpleTuner's own families (Flux, Qwen-Image, LTX-Video, Wan 2.1
  I2V) for the tests; it imports none of the above.

Nothing here imports SimpleTuner at import time. See docs/simpletuner.md.
"""
