"""Calorimeter showers: charged pions in an ePIC-like forward HCal, point cloud vs voxel image.

    python experiments/main.py --config=experiments/calo.py              # point-cloud model, ~9 min on 2 CPUs
    python experiments/main.py --config=experiments/calo.py:image        # voxel-image model, ~15 min on 2 CPUs
    python experiments/main.py --config=experiments/calo.py:full         # paper scale, accelerators
    python experiments/main.py --config=experiments/calo.py:image,full   # image model at paper scale
    python experiments/main.py --config=experiments/calo.py:tiny         # smoke run (tests)

Data: showers simulated on the fly by :func:`fpcd.data.calo.simulate` (no files, no downloads),
or a real file in the point-cloud layout with ``--config.data.path=/data/hcal_pions.h5``
(``hcal_cells`` (N, 200, 5), ``cluster`` (N, 4)). The last ``data.test_fraction`` is held out.
Once both ``runs/calo`` and ``runs/calo_image`` exist, the later one writes the comparison table.
"""

import ml_collections

from fpcd.config import distill_section, generate_section, train_section

VARIANTS = ("image", "full", "tiny")


def _train(*args, ema_decay=0.999, ema_warmup=True, **kwargs):
    """A training section; EMA 0.999 with warm-up (``min(0.999, (1 + n) / (10 + n))``): without the
    warm-up 0.999 lagged the few-thousand-step CPU runs and 0.995 was used (benchmarks/README.md, "Fidelity levers")."""
    return train_section(*args, ema_decay=ema_decay, ema_warmup=ema_warmup, **kwargs)


def get_config(variant: str = ""):
    variants = {v.strip() for v in variant.split(",") if v.strip()}
    if not variants <= set(VARIANTS) or {"full", "tiny"} <= variants:
        raise ValueError(f"experiments/calo.py: unknown variant {variant!r}; use a comma-separated subset of "
                         f"{', '.join(VARIANTS)} (not both full and tiny)")
    image = "image" in variants
    scale = "full" if "full" in variants else "tiny" if "tiny" in variants else ""
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "calo"
    cfg.representation = "image" if image else "cloud"
    cfg.name = "calo" + ("_image" if image else "") + (f"_{scale}" if scale else "")
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.path = ""  # a point-cloud hdf5 file (hcal_cells, cluster); empty: simulate
    cfg.data.num_showers = 12000
    cfg.data.momentum_range = (1.0, 100.0)  # GeV, log-uniform
    cfg.data.theta_range = (16.0, 18.0)  # degrees
    cfg.data.phi = 0.0  # degrees; the azimuth of the particles (for trajectory-relative cell coordinates)
    cfg.data.test_fraction = 0.25
    cfg.data.dequantisation = 0.5  # width of the uniform noise on cell indices (1: the whole cell)
    cfg.data.max_cells = 0  # 0: the largest shower, rounded up to a multiple of 8
    cfg.data.buckets = (32, 64, 96, 128)  # padded lengths of the N_cells buckets (point clouds)

    cfg.sde = ml_collections.ConfigDict({"beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"})

    cfg.cluster_model = ml_collections.ConfigDict({"width": 64, "depth": 2, "fourier_scale": 16.0})
    # layer_embedding: each point's layer through a learned embedding (benchmarks/README.md: on its own, every
    # classifier AUC 0.006-0.023 lower). Off for the image preset, whose runs predate it.
    cfg.cell_model = ml_collections.ConfigDict({"width": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2,
                                                "fourier_scale": 16.0, "layer_embedding": not image})
    cfg.image_model = ml_collections.ConfigDict({"channels": (8, 16, 32), "context_width": 64, "fourier_scale": 16.0})
    # The image preset keeps the EMA it was measured with (0.995, no warm-up).
    ema = {} if not image else {"ema_decay": 0.995, "ema_warmup": False}
    cfg.train_global = _train(num_steps=3000, batch_size=256, learning_rate=1e-3, warmup_steps=100,
                              checkpoint_every=1000, **ema)
    if image:
        cfg.train_set = _train(num_steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=100,
                               checkpoint_every=500, **ema)
    else:
        cfg.train_set = _train(num_steps=5000, batch_size=64, learning_rate=1e-3, warmup_steps=100,
                               checkpoint_every=500)

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 1500  # showers generated per run; the floor uses two disjoint test subsets
    cfg.sampling.batch_size = 250
    cfg.sampling.resolve_collisions = True  # a generated point in a taken cell moves to the nearest free one
    cfg.sampling.collision_metric = "mm"  # nearest in mm ("mm") or in layer/cell steps ("index")
    cfg.sampling.clip_denoised = False  # clip each denoised estimate to the training data's range
    cfg.sampling.runs = ml_collections.ConfigDict({
        "ddim_50": {"method": "ddim", "steps": 50},
        "em_100": {"method": "em", "steps": 100},
    })

    # Progressive distillation of both stages, 64 -> 32 -> ... -> 1 DDIM steps.
    cfg.distill = distill_section(rounds=6, teacher_steps=64, num_steps=700, learning_rate=2e-4,
                                  sample_steps=(8, 4, 2, 1), warmup_steps=50,
                                  checkpoint_every=350)

    # --mode=generate: showers at momenta log-uniform and angles uniform in these ranges (empty: the training ones)
    cfg.generate = generate_section(momentum_range=(), theta_range=())

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.evaluators = ("observables", "classifier")  # fpcd.experiments.calo; the classifier is the slow one
    cfg.eval.seed = 42
    cfg.eval.momentum_bins = (1.0, 5.0, 20.0, 100.0)
    cfg.eval.classifier = ml_collections.ConfigDict({"hidden": (256, 256), "epochs": 60, "batch_size": 256,
                                                     "learning_rate": 5e-4})
    if image:  # a U-Net shower costs ~9x a point-cloud one on CPU: one sampler
        cfg.sampling.runs = ml_collections.ConfigDict({"ddim_50": {"method": "ddim", "steps": 50}})
    if image:  # distilling the U-Net costs ~9x the point-cloud model's ~12 min on CPU: opt in with rounds
        cfg.distill.rounds = 0
    other = "calo" + ("" if image else "_image") + (f"_{scale}" if scale else "")
    cfg.eval.compare_with = f"runs/{other}"  # the other representation's workdir, if it exists

    if scale == "tiny":
        cfg.data.num_showers = 400
        cfg.data.test_fraction = 0.3
        cfg.data.momentum_range = (2.0, 30.0)
        cfg.data.buckets = (32,)
        cfg.cluster_model.update({"width": 16, "depth": 1})
        cfg.cell_model.update({"width": 16, "depth": 1, "num_heads": 2})
        cfg.image_model.update({"channels": (4, 8), "context_width": 16})
        cfg.train_global = _train(num_steps=60, batch_size=32, learning_rate=2e-3, warmup_steps=5,
                                  checkpoint_every=30, log_every=30)
        cfg.train_set = _train(num_steps=60, batch_size=16, learning_rate=2e-3, warmup_steps=5,
                               checkpoint_every=30, log_every=30)
        cfg.sampling.num_samples = 48
        cfg.sampling.batch_size = 48
        # The ODE is tested by the gmm and jets tiny runs; the calo tiny run samples its student instead.
        cfg.sampling.runs = ml_collections.ConfigDict({"em_10": {"method": "em", "steps": 10}})
        cfg.eval.momentum_bins = (2.0, 8.0, 30.0)
        cfg.distill = distill_section(rounds=0 if image else 1, teacher_steps=2, num_steps=20,
                                      learning_rate=1e-3, sample_steps=(1,), warmup_steps=2,
                                      log_every=10, checkpoint_every=10)
        cfg.eval.classifier.update({"hidden": (16,), "epochs": 3, "batch_size": 16})
    elif scale == "full":
        cfg.data.num_showers = 120_000
        cfg.data.test_fraction = 0.2
        cfg.cluster_model.update({"width": 128, "depth": 3})
        cfg.cell_model.update({"width": 128, "depth": 6, "num_heads": 8})
        cfg.image_model.update({"channels": (32, 64, 128), "context_width": 128})
        cfg.train_global = _train(num_steps=30_000, batch_size=1024, learning_rate=1e-3, warmup_steps=1000,
                                  checkpoint_every=5000, ema_decay=0.999)
        cfg.train_set = _train(num_steps=200_000, batch_size=256, learning_rate=3e-4, warmup_steps=5000,
                               checkpoint_every=5000, ema_decay=0.999)
        cfg.sampling.num_samples = 10_000
        cfg.sampling.batch_size = 2000
        cfg.sampling.runs = ml_collections.ConfigDict({
            "pc_250": {"method": "pc", "steps": 125, "snr": 0.16},
            "em_300": {"method": "em", "steps": 300},
            "ddim_100": {"method": "ddim", "steps": 100},
            "ode_1e-5": {"method": "ode", "rtol": 1e-5, "atol": 1e-5},
        })
        cfg.eval.classifier.update({"hidden": (2048, 2048, 2048), "epochs": 50, "batch_size": 1000,
                                    "learning_rate": 2e-4})
        cfg.distill = distill_section(rounds=9, teacher_steps=512, num_steps=20_000, learning_rate=1e-4,
                                      sample_steps=(8, 4, 2, 1), warmup_steps=500,
                                      checkpoint_every=5000, ema_decay=0.999)
    return cfg
