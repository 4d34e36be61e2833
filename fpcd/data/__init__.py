"""Data sources and their model-side representations.

* Sources: toy distributions with exact answers (:mod:`~fpcd.data.gmm`), JetNet jets from
  Pythia 8 + FastJet (:mod:`~fpcd.data.jetnet`), calorimeter showers (:mod:`~fpcd.data.calo`, its
  detector and shower physics in :mod:`~fpcd.data.calo_physics`) and EIC DIS events
  (:mod:`~fpcd.data.eic`).
* Shared by the generated sources: chunked seeds, settings keys, the atomic hdf5 save and the cache
  (:mod:`~fpcd.data.common`), generator worker processes (:mod:`~fpcd.data.workers`) and collider
  kinematics (:mod:`~fpcd.data.kinematics`).
* Model side: ``*_transforms`` (features and their exact inverses), length buckets of padded clouds
  (:mod:`~fpcd.data.buckets`) and :mod:`~fpcd.data.standardisation`.
"""
