"""Data sources: toy distributions with exact answers (:mod:`~fpcd.data.gmm`), JetNet jets from
Pythia 8 + FastJet (:mod:`~fpcd.data.jetnet`) and calorimeter showers (:mod:`~fpcd.data.calo`)."""
