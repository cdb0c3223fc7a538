"""The base model: a class-conditional TinyDiT trained with flow matching and CFG dropout.

    python -m common.pretrain                  # cpu preset without CUDA, gpu preset with it
    python -m common.pretrain --preset smoke   # seconds; what the tests run

ram.py and lfm_stability.py start from this model (`base_model(cfg)`), attention_sinks.py from the
same recipe with --patch 2; each is cached in checkpoints/ by config hash. The run writes config.json, results.json
(params, train_seconds, evaluator accuracy, sample accuracy with and without CFG, evaluator FD)
and fig_samples.png into --out.
"""

import dataclasses
import time

import torch
from tqdm import tqdm

from common import data as data_mod
from common import dit
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT, count_params
from common.evaluator import get_evaluator
from common.flow import fm_loss, interpolate, sample_t
from common.plot import save_image_panels
from common.sampler import autocast, sample_labels
from common.train import EMA, load_or_train, make_optimizer, optimizer_step


@dataclasses.dataclass
class Config(BaseConfig):
    dataset: str = field("shapes", "shapes (embedded, procedural) or mnist (IDX files in --data-root)",
                         choices=("shapes", "mnist"))
    data_root: str = field("", "folder with the MNIST IDX files (README: how to get them)", shown="data/mnist")
    size: int = field(16, "image side in pixels; 16 keeps a CPU run in minutes")
    model: str = field("s", "TinyDiT size preset (xs, s, m, l; see common/dit.py)", choices=tuple(SIZES))
    patch: int = field(4, "patch size P: 4 gives 16 tokens at 16 px, cheap on a CPU")
    steps: int = field(3000, "optimizer steps (about 160 s on 2 CPU cores at batch 64)")
    batch: int = field(64, "batch size; on a CPU more, smaller steps beat fewer large ones")
    lr: float = field(2e-3, "AdamW learning rate; high, because the model is tiny and the run short")
    ema: float = field(0.999, "EMA decay of the weights we sample with (warmed up in common/train.py)", min=0,
                       below=1)
    p_uncond: float = field(0.1, "CFG dropout: share of labels replaced by the null label", min=0, below=1)
    time_sampler: str = field("logit_normal", "training-time distribution (SD3 uses logit_normal)",
                              choices=("uniform", "logit_normal"))
    n_train: int = field(20000, "training images (shapes are drawn once, then reused)")
    cfg_scale: float = field(3.0, "guidance scale for the 'with CFG' samples", min=0)
    sample_steps: int = field(32, "Euler steps when sampling")
    n_samples: int = field(576, "samples per evaluation (balanced over classes)")
    eval_steps: int = field(300, "evaluator training steps")

    def validate(self):
        if self.size < 8 or self.size % self.patch:
            raise UserError(f"--size {self.size} must be >= 8 and divisible by --patch {self.patch}")


PRESETS = {
    "smoke": dict(model="xs", steps=30, batch=32, n_train=2000, sample_steps=4, n_samples=72, eval_steps=30),
    "cpu": dict(),
    "gpu": dict(model="m", patch=2, steps=6000, batch=256, n_samples=2304, eval_steps=600),
}


def model_kwargs(cfg, n_classes: int, channels: int) -> dict:
    return dict(img_size=cfg.size, channels=channels, patch=cfg.patch, n_classes=n_classes, **SIZES[cfg.model])


def train_config(cfg) -> dict:
    """Everything that changes the trained weights, and nothing else: the checkpoint key."""
    keys = ("dataset", "size", "model", "patch", "steps", "batch", "lr", "ema", "p_uncond", "time_sampler",
            "n_train", "seed")
    return dict(kind="base", data_version=data_mod.VERSION, model_version=dit.VERSION,
                **{k: getattr(cfg, k) for k in keys})


def base_model(cfg, device, data=None, data_key: str | None = None) -> tuple[TinyDiT, dict]:
    """The trained base TinyDiT for this config (from the cache, or trained now) in eval mode.

    A script may train on its own data (a pruned subset, say) by passing `data` together with a
    `data_key` naming it: the key goes into the checkpoint hash, so two datasets never share a file."""
    if (data is None) != (data_key is None):
        raise ValueError("pass data and data_key together: the key tells the cache which data trained the model")
    if data is None:
        data = data_mod.load(cfg.dataset, cfg.n_train, cfg.size, cfg.seed, "train", cfg.data_root or None)
    torch.manual_seed(cfg.seed)  # the weight init
    model = TinyDiT(**model_kwargs(cfg, data.n_classes, data.channels))

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, cfg.ema)
        bar = tqdm(range(cfg.steps), desc="pretrain", mininterval=1.0)
        for _ in bar:
            idx = torch.randint(0, len(data.images), (cfg.batch,), generator=g)
            x, y = data.images[idx], data.labels[idx]
            drop = torch.rand(cfg.batch, generator=g) < cfg.p_uncond
            y = torch.where(drop, model.null_label, y)  # CFG dropout: learn v(x, t, null) too
            eps = torch.randn(x.shape, generator=g)
            t = sample_t(cfg.batch, cfg.time_sampler, g)
            x, y, eps, t = x.to(device), y.to(device), eps.to(device), t.to(device)
            with autocast(device):
                loss = fm_loss(model(interpolate(x, eps, t), t, y), x, eps).mean()
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)
        return dict(final_loss=loss.item())

    key = train_config(cfg) if data_key is None else dict(train_config(cfg), data_key=data_key)
    info = load_or_train("base", key, model, fit)
    return model.to(device).eval(), info


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "pretrain")
    root = cfg.data_root or None
    held_out = data_mod.load(cfg.dataset, cfg.n_samples, cfg.size, cfg.seed, "test", root)
    evaluator, ev_acc = get_evaluator(cfg.dataset, cfg.size, device, cfg.eval_steps, cfg.seed, root)
    model, info = base_model(cfg, device)

    y = torch.arange(cfg.n_samples) % held_out.n_classes  # balanced labels
    seed = cfg.seed + 1  # sampling noise, the same for both settings
    x_cfg = sample_labels(model, y, cfg.sample_steps, cfg.cfg_scale, seed)
    x_plain = sample_labels(model, y, cfg.sample_steps, 1.0, seed)
    results = dict(
        params=count_params(model),
        train_seconds=round(info["train_seconds"], 1),
        loaded_from_cache=info["cached"],
        final_train_loss=info.get("final_loss"),
        evaluator_accuracy=ev_acc,
        sample_accuracy_cfg=evaluator.accuracy(x_cfg, y),
        sample_accuracy_nocfg=evaluator.accuracy(x_plain, y),
        fd_cfg=evaluator.fd(x_cfg, held_out.images),
        fd_nocfg=evaluator.fd(x_plain, held_out.images),
        cfg_scale=cfg.cfg_scale,
        metric_note="accuracy / FD are from the repository's CNN evaluator (stand-ins for CLIP-T / FID)",
        device=str(device),
        seconds=round(time.perf_counter() - t0, 1),
    )
    k = held_out.n_classes
    save_image_panels([(f"CFG scale {cfg.cfg_scale}", x_cfg[:4 * k]), ("no CFG", x_plain[:4 * k])],
                      out / "fig_samples.png", nrow=k,
                      title=f"base TinyDiT samples, one column per class ({', '.join(held_out.class_names[:3])}, ...)")
    save_json(out / "results.json", results)
    print_table([(k_, v) for k_, v in results.items() if k_ != "metric_note"])
    print(f"wrote {out}/results.json and fig_samples.png")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python -m common.pretrain", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
