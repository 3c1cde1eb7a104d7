"""Benchmarks and the cost model behind ``lasp2 bench`` and ``lasp2 plan``.

- :mod:`.harness`: measuring (timing, communication per layer call, peak memory), self-launched
  gloo ranks or torchrun ranks;
- :mod:`.suites`: what is measured (every strategy of the registry,
  ``lasp2.parallel.strategies``, each against the one-device ideal);
- :mod:`.report`: results.json, results.md and PNG plots (matplotlib, the ``bench`` extra);
- :mod:`.cost_model`: the alpha-beta model of one layer; :mod:`.plan`, :mod:`.plan_render`:
  whole-model predictions and the projection table; :mod:`.validate`: the model fitted on this
  machine and compared with measurements.

Nothing here is imported by ``import lasp2``.
"""
