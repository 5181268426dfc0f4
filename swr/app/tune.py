"""``swr bench --tune``: per-method learning rate and own knob, chosen on validation.

The unifying PETL study found that untuned comparisons mislead, so before the final
seeds every (task, method, budget) gets a small Ray Tune search over the learning
rate (log-uniform, 3e-4 to 1e-1) and the method's own knob (LoRA rank, adapter
width, TAPS penalty, prompt length), scored by validation accuracy of seed 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def tune_methods(cfg, cells: list[tuple[str, str, str, int]], run_job: Callable[..., dict],
                 log: Callable[[str], None] = print) -> dict[tuple[str, str, str], tuple[float, dict]]:
    """Best (lr, knobs) per (task, method, budget) among ``cells``, by validation accuracy.

    ``run_job(task, method, budget, seed, cfg, lr, knobs, threads=1)`` runs one trial and
    returns its result row; each method's own knobs and values come from its
    :attr:`~swr.methods.Method.tunables`.
    """
    from ray import tune

    from ..methods import METHODS
    from ..policies.ray_setup import init_ray

    init_ray()
    best: dict[tuple[str, str, str], tuple[float, dict]] = {}
    groups = sorted({(t, m, b) for t, m, b, _ in cells})
    for task, method, budget in groups:
        space = {"lr": tune.loguniform(3e-4, 1e-1)}
        for knob, values in getattr(METHODS.get(method), "tunables", {}).items():
            space[knob] = tune.choice(values)

        def trainable(config, task=task, method=method, budget=budget):
            knobs = {k: v for k, v in config.items() if k != "lr" and v is not None}
            row = run_job(task, method, budget, 0, cfg, config["lr"], knobs, threads=1)
            # a size that cannot fit the budget scores nothing (its row says "skipped")
            tune.report({"val_acc": float(row.get("val_acc") or 0.0)})

        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=cfg.tune_trials),
            run_config=tune.RunConfig(name=f"tune-{method}-{budget}",
                                      storage_path=str(Path(cfg.out).resolve() / "tune"),
                                      verbose=0),
        )
        result = tuner.fit().get_best_result()
        conf = dict(result.config)
        lr = conf.pop("lr")
        knobs = {k: v for k, v in conf.items() if v is not None}
        best[(task, method, budget)] = (lr, knobs)
        log(f"tune {method} @ {budget} on {task}: lr {lr:.2g} {knobs} "
            f"-> val {result.metrics['val_acc']:.4f}")
    return best
