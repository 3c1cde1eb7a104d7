"""Benchmarks and the cost model behind ``lasp2 bench`` and ``lasp2 plan``.

- :mod:`.harness`: measuring (timing, communication per layer call, peak memory), self-launched
  gloo ranks or torchrun ranks;
- :mod:`.suites`: what the sequence-parallel suites measure (every strategy of the registry,
  ``lasp2.parallel.strategies``, each against the one-device ideal);
- :mod:`.onedevice`: the one-device suites ``ops`` (chunked ops against the quadratic form and
  the per-token recurrence) and ``gpu`` (the fla backend against fla's own op);
  :mod:`.memory`: per-rank bytes of ``lasp2 train``, FSDP2 against DDP; :mod:`.inputs`,
  :mod:`.rss`: the inputs and the CPU peak-memory probe they share;
- :mod:`.report`: results.json, results.md and PNG plots (matplotlib, the ``bench`` extra);
- :mod:`.cost_model`: the alpha-beta model of one layer (:mod:`.network`: its communication
  times); :mod:`.baselines`: the paper's baselines
  lasp2 does not ship (costed only); :mod:`.step_model`: one training step term by term;
  :mod:`.hardware`: presets as data and the calibration knobs; :mod:`.published`: the LASP-2
  paper's measurements and the calibration fitted to them; :mod:`.plan`, :mod:`.plan_render`:
  predictions, recommendation and the projection table; :mod:`.validate`: the model fitted on this
  machine and compared with measurements.

Nothing here is imported by ``import lasp2``.
"""
