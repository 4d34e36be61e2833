"""CaloChallenge 2022 electron showers (datasets 2 and 3) as point clouds of hit voxels.

    python experiments/main.py --config=experiments/calochallenge.py              # dataset-2 layout, 2 CPUs
    python experiments/main.py --config=experiments/calochallenge.py:tiny         # smoke run (tests)
    python experiments/main.py --config=experiments/calochallenge.py:ds2 --config.data.path=dataset_2_1.hdf5
    python experiments/main.py --config=experiments/calochallenge.py:ds3 --config.data.path=dataset_3_1.hdf5
    python experiments/main.py --config=experiments/calochallenge.py --mode=generate \
        --config.generate.num_events=10000 --config.generate.output=generated.h5

Data: a CaloChallenge file (``incident_energies`` (N, 1), ``showers`` (N, voxels), MeV) with
``--config.data.path``, checked against the binning of ``data.dataset``; without one, electron
showers simulated on the fly in the dataset's readout (:func:`fpcd.data.calochallenge.simulate`,
incident energies log-uniform in ``data.energy_range``). The last ``data.test_fraction`` is held out.

``--mode=generate`` writes ``generate.num_events`` showers in the challenge's layout from the
workdir alone, at incident energies log-uniform in ``generate.energy_range`` (MeV; default the
training range) or those of ``generate.conditions_file``, with the sampler run ``generate.sampler``
(a name of ``sampling.runs`` or ``student_<k>``; default the first run).
"""

import ml_collections

from fpcd.config import distill_section, generate_section, train_section

VARIANTS = ("", "tiny", "ds2", "ds3")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"experiments/calochallenge.py: unknown variant {variant!r}; expected one of {VARIANTS}")
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "calochallenge"
    cfg.name = "calochallenge" + (f"_{variant}" if variant else "")
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.dataset = "2"  # the binning: "2" (45 x 16 x 9 voxels) or "3" (45 x 50 x 18)
    cfg.data.path = ""  # a CaloChallenge hdf5 file; empty: the built-in simulated electron showers
    cfg.data.num_showers = 6000
    cfg.data.energy_range = (1e3, 1e6)  # MeV, log-uniform (the challenge's 1 GeV - 1 TeV)
    cfg.data.test_fraction = 0.35
    cfg.data.max_points = 0  # points per shower (0: the most hits, rounded up to 8; fewer: the most energetic)
    cfg.data.dequantisation = 0.5  # jitter of the voxel indices: uniform in (-d/2, d/2)
    cfg.data.threshold_mev = 0.01515  # generated voxels below it are cut (the challenge's 15.15 keV)
    cfg.data.layer_energies = True  # stage 1 also samples each layer's share of the deposited energy
    cfg.data.rotate = True  # each training shower turned about the axis by a random number of angular bins
    cfg.data.buckets = (256, 384, 512)  # padded lengths of the hit-multiplicity buckets (then max_points)

    cfg.sde = ml_collections.ConfigDict({"beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"})

    cfg.shower_model = ml_collections.ConfigDict({"width": 128, "depth": 3, "fourier_scale": 16.0})
    cfg.point_model = ml_collections.ConfigDict({"width": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2,
                                                 "fourier_scale": 16.0, "layer_embedding": True})
    cfg.train_global = train_section(num_steps=2000, batch_size=256, learning_rate=1e-3, warmup_steps=100,
                                     checkpoint_every=1000, ema_decay=0.995)
    cfg.train_set = train_section(num_steps=1800, batch_size=16, learning_rate=1e-3, warmup_steps=100,
                                  checkpoint_every=300, ema_decay=0.995)

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 1000  # showers per run; the floor uses two disjoint held-out subsets of this size
    cfg.sampling.batch_size = 100
    cfg.sampling.clip_denoised = False  # clip each denoised estimate to the training data's range
    cfg.sampling.resolve_collisions = True  # a point decoded to a taken voxel moves to the nearest free one
    cfg.sampling.runs = ml_collections.ConfigDict({
        "ddim_16": {"method": "ddim", "steps": 16},
        "dpmpp_2m_8": {"method": "dpmpp_2m", "steps": 8},
    })
    cfg.distill = distill_section(rounds=0, teacher_steps=32, num_steps=300, learning_rate=2e-4,
                                  sample_steps=(4, 1), warmup_steps=20, checkpoint_every=150)

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.evaluators = ("features", "classifier")  # fpcd.experiments.calochallenge_evaluation
    cfg.eval.seed = 42
    cfg.eval.num_bins = 30  # histogram bins of the separation power
    cfg.eval.fpd_batches, cfg.eval.fpd_points = 10, 5  # FPD's draws per sample size and sample sizes (jetnet: 20, 10)
    cfg.eval.figure_layers = (2, 8, 14, 20, 30)  # layers whose energies (and middle layer's EC, width) are drawn
    cfg.eval.classifier = ml_collections.ConfigDict({"hidden": (128, 128), "epochs": 30, "batch_size": 128,
                                                     "learning_rate": 5e-4})

    cfg.generate = generate_section(energy_range=(), conditions_file="")

    if variant == "tiny":
        cfg.data.num_showers = 160
        cfg.data.energy_range = (1e3, 1e4)
        cfg.data.test_fraction = 0.5
        cfg.data.layer_energies = False
        cfg.data.max_points = 64  # the 64 most energetic hits of each shower (the tests' time budget)
        cfg.data.buckets = ()  # one padded length: one compilation per stage (the tests' time budget)
        cfg.shower_model.update({"width": 16, "depth": 1})
        cfg.point_model.update({"width": 8, "depth": 1, "num_heads": 1, "mlp_ratio": 1})
        cfg.train_global = train_section(num_steps=40, batch_size=32, learning_rate=2e-3, warmup_steps=5,
                                         checkpoint_every=20, log_every=20, ema_decay=0.9)
        cfg.train_set = train_section(num_steps=20, batch_size=8, learning_rate=2e-3, warmup_steps=2,
                                      checkpoint_every=10, log_every=10, ema_decay=0.9)
        cfg.sampling.num_samples = 40
        cfg.sampling.batch_size = 20
        cfg.sampling.runs = ml_collections.ConfigDict({"ddim_4": {"method": "ddim", "steps": 4}})
        cfg.distill = distill_section(rounds=1, teacher_steps=2, num_steps=4, learning_rate=1e-3, sample_steps=(1,),
                                      warmup_steps=1, log_every=2, checkpoint_every=2)
        cfg.eval.num_bins = 10
        cfg.eval.fpd_batches, cfg.eval.fpd_points = 2, 2
        cfg.eval.figure_layers = (5, 10)
        cfg.eval.classifier.update({"hidden": (8,), "epochs": 2, "batch_size": 16})
        cfg.generate.chunk_size = 16
    elif variant in ("ds2", "ds3"):  # paper scale on the challenge's files (accelerators)
        cfg.data.dataset = variant[-1]
        cfg.data.test_fraction = 0.1
        cfg.data.num_showers = 100_000
        cfg.data.buckets = (128, 256, 384, 512, 768, 1024, 1536) if variant == "ds2" else \
            (256, 512, 1024, 2048, 3072, 4096)
        cfg.shower_model.update({"width": 256, "depth": 4})
        cfg.point_model.update({"width": 128, "depth": 6, "num_heads": 8})
        cfg.train_global = train_section(num_steps=50_000, batch_size=1024, learning_rate=1e-3, warmup_steps=1000,
                                         checkpoint_every=5000)
        cfg.train_set = train_section(num_steps=200_000, batch_size=128, learning_rate=3e-4, warmup_steps=5000,
                                      checkpoint_every=5000)
        cfg.sampling.num_samples = 10_000
        cfg.sampling.batch_size = 500
        cfg.sampling.runs = ml_collections.ConfigDict({
            "ddim_50": {"method": "ddim", "steps": 50},
            "dpmpp_2m_16": {"method": "dpmpp_2m", "steps": 16},
            "ode_1e-5": {"method": "ode", "rtol": 1e-5, "atol": 1e-5},
        })
        cfg.distill = distill_section(rounds=9, teacher_steps=512, num_steps=20_000, learning_rate=1e-4,
                                      sample_steps=(8, 4, 2, 1), warmup_steps=500, checkpoint_every=5000,
                                      ema_decay=0.999)
        cfg.eval.fpd_batches, cfg.eval.fpd_points = 20, 10
        cfg.eval.classifier.update({"hidden": (512, 512, 512), "epochs": 50, "batch_size": 1000,
                                    "learning_rate": 2e-4})
    return cfg
