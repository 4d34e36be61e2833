"""EIC neutral-current DIS events (10 GeV e- on 275 GeV p, Q^2 > 25 GeV^2) as point clouds.

    python experiments/main.py --config=experiments/eic.py                 # default, ~13 min on 2 CPUs
    python experiments/main.py --config=experiments/eic.py:tiny            # smoke run (tests)
    python experiments/main.py --config=experiments/eic.py:full --workdir=/scratch/eic   # paper scale, GPUs

Data: events generated offline with Pythia 8 (``fpcd.data.eic``, cached under ``data.cache_dir``),
or a file in the raw layout with ``--config.data.path=/data/eic_events.h5`` (``particles`` (N, 50, 5)
= (pT, eta, phi, PDG id, z), optional ``kinematics``). The last ``data.test_fraction`` is held out.

``--mode=generate --config.generate.num_events=N`` writes N events in the raw layout from the
trained workdir alone.

Stage 1 samples the scattered electron and the multiplicity (pT_e, eta_e, N), stage 2 the N
particles given them. ``--mode=all`` also distils both stages when ``config.distill.rounds`` > 0
(the full preset: 512 -> 1 DDIM steps).
"""

import ml_collections

from fpcd.config import distill_section, generate_section
from fpcd.config import train_section as _train


def get_config(variant: str = ""):
    if variant not in ("", "tiny", "full"):
        raise ValueError(f"experiments/eic.py: unknown variant {variant!r}; expected '', 'tiny' or 'full'")
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "eic"
    cfg.name = "eic" + (f"_{variant}" if variant else "")
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.path = ""  # an hdf5 file in the raw layout; empty: generate with Pythia 8
    cfg.data.num_events = 40_000
    cfg.data.q2_min = 25.0  # GeV^2
    cfg.data.test_fraction = 0.15
    cfg.data.cache_dir = ""  # default: $FPCD_CACHE or ~/.cache/fpcd
    cfg.data.workers = 0  # generator processes (0: all CPUs)
    cfg.data.buckets = (16, 24, 32)  # padded lengths of the multiplicity buckets (then 49)

    cfg.sde = ml_collections.ConfigDict({"beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"})

    cfg.event_model = ml_collections.ConfigDict({"width": 128, "depth": 3, "fourier_scale": 16.0})
    cfg.particle_model = ml_collections.ConfigDict({"width": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2,
                                                    "fourier_scale": 16.0})
    cfg.train_global = _train(num_steps=3000, batch_size=256, learning_rate=1e-3, warmup_steps=100,
                              checkpoint_every=1000, ema_decay=0.995)
    cfg.train_set = _train(num_steps=12_000, batch_size=64, learning_rate=1e-3, warmup_steps=200,
                           checkpoint_every=1000, ema_decay=0.995)  # the particle stage

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 2000  # events per run; the floor uses two disjoint held-out subsets of this size
    cfg.sampling.batch_size = 500
    cfg.sampling.runs = ml_collections.ConfigDict({
        "ddim_50": {"method": "ddim", "steps": 50},
        "em_100": {"method": "em", "steps": 100},
        "pc_100": {"method": "pc", "steps": 50, "snr": 0.16},
        "dpmpp_2m_16": {"method": "dpmpp_2m", "steps": 16},
        "heun_15": {"method": "heun", "steps": 8},
        "ode_1e-3": {"method": "ode", "rtol": 1e-3, "atol": 1e-3},  # the probability flow, adaptive Dopri5
    })

    # Off in the default (its 15-minute budget); --config.distill.rounds=6 distils both stages 64 -> 1 DDIM steps
    # in ~9 more minutes on 2 CPU cores and samples the 8-, 4-, 2- and 1-step students.
    cfg.distill = distill_section(rounds=0, teacher_steps=64, num_steps=700, learning_rate=2e-4,
                                  sample_steps=(8, 4, 2, 1), warmup_steps=50, checkpoint_every=350)

    cfg.generate = generate_section()  # --mode=generate: events in the raw layout from the trained workdir alone

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.evaluators = ("observables", "classifier")  # fpcd.experiments.eic
    cfg.eval.seed = 42
    cfg.eval.classifier = ml_collections.ConfigDict({"hidden": (128, 128), "epochs": 40, "batch_size": 256,
                                                     "learning_rate": 5e-4})

    if variant == "tiny":
        cfg.data.num_events = 600
        cfg.data.test_fraction = 0.3
        cfg.data.buckets = ()  # one padded length (49): one compilation per stage (the tests' time budget)
        cfg.event_model.update({"width": 16, "depth": 1})
        cfg.particle_model.update({"width": 16, "depth": 1, "num_heads": 2})
        cfg.train_global = _train(num_steps=60, batch_size=32, learning_rate=2e-3, warmup_steps=5,
                                  checkpoint_every=30, log_every=30, ema_decay=0.9)
        cfg.train_set = _train(num_steps=60, batch_size=16, learning_rate=2e-3, warmup_steps=5,
                               checkpoint_every=30, log_every=30, ema_decay=0.9)
        cfg.sampling.num_samples = 60
        cfg.sampling.batch_size = 60
        # One run, PC (the corrector on a masked, conditioned set model; DDIM and EM: the other tiny runs).
        cfg.sampling.runs = ml_collections.ConfigDict({"pc_10": {"method": "pc", "steps": 5, "snr": 0.16}})
        cfg.distill = distill_section(rounds=0, teacher_steps=2, num_steps=20, learning_rate=1e-3,
                                      sample_steps=(1,), warmup_steps=2, log_every=10,
                                      checkpoint_every=10)
        cfg.eval.classifier.update({"hidden": (16,), "epochs": 3, "batch_size": 16})
    elif variant == "full":
        cfg.data.num_events = 1_000_000
        cfg.data.test_fraction = 0.12  # 120,000 held out: the two disjoint sets of 50,000 the floor needs, with room
        cfg.data.buckets = (16, 24, 32, 40)
        cfg.event_model.update({"width": 256, "depth": 4})
        cfg.particle_model.update({"width": 128, "depth": 8, "num_heads": 8})
        cfg.train_global = _train(num_steps=50_000, batch_size=1024, learning_rate=1e-3, warmup_steps=1000,
                                  checkpoint_every=5000)
        cfg.train_set = _train(num_steps=300_000, batch_size=256, learning_rate=3e-4, warmup_steps=5000,
                               checkpoint_every=5000)
        cfg.sampling.num_samples = 50_000
        cfg.sampling.batch_size = 5000
        cfg.sampling.runs = ml_collections.ConfigDict({
            "pc_250": {"method": "pc", "steps": 125, "snr": 0.16},
            "em_300": {"method": "em", "steps": 300},
            "ddim_100": {"method": "ddim", "steps": 100},
            "dpmpp_2m_16": {"method": "dpmpp_2m", "steps": 16},
            "ode_1e-5": {"method": "ode", "rtol": 1e-5, "atol": 1e-5},
        })
        cfg.eval.classifier.update({"hidden": (512, 512, 512), "epochs": 50, "batch_size": 1000,
                                    "learning_rate": 2e-4})
        # CaloScore v2's schedule: 512 -> 256 -> ... -> 1 steps.
        cfg.distill = distill_section(rounds=9, teacher_steps=512, num_steps=20_000, learning_rate=1e-4,
                                      sample_steps=(8, 4, 2, 1), warmup_steps=500,
                                      checkpoint_every=5000, ema_decay=0.999)
    return cfg
