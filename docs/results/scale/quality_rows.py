"""The pilots' gradient-quality rows (pilots.md): for each (dataset, base configuration, samples, variants),
one markdown row per variant with the per-layer NSR and the cost per estimate, measured by the study's own
glrnet.experiments.gradient_quality on one batch of 32 training images at the initial weights."""
from glrnet.data import load_dataset
from glrnet.experiments import gradient_quality
from glrnet.train import TrainConfig


def print_rows(cases, root: str, only: str | None = None) -> None:
    for dataset, base, samples, variants in cases:
        if only and dataset != only:
            continue
        data = load_dataset(dataset, f"{root}/{dataset}", None, 0.1)
        x, y = data.x_train[:32], data.y_train[:32]
        for name, over in variants:
            cfg = TrainConfig(**{**base, **over, "dataset": dataset, "data_dir": f"{root}/{dataset}"}).validate()
            r = gradient_quality(cfg, data, x, y, samples)
            print(f"| {base['arch']}, {dataset} | {name} | {samples} | "
                  + ", ".join(f"{layer['layer']} {layer['nsr']:.3g}" for layer in r["layers"])
                  + f" | {r['seconds_per_estimate'] * 1000:.0f} |", flush=True)
