"""The measuring instrument every script shares: a small CNN classifier trained on the dataset.

It gives our toy stand-ins for the papers' metrics -- name them as stand-ins in every output:
    class accuracy, label log-probability  ~ CLIP-T / GenEval (does the sample show the label?)
    Frechet distance of penultimate features ~ FID  ("evaluator FD")
    paired feature distance                  ~ LPIPS (how far did a sample move?)
    paired feature cosine                    ~ DINOv2 / ArcFace similarity
Trained once per (dataset, size, steps, seed) and cached in checkpoints/.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import data as data_mod
from common.train import load_or_train, make_optimizer, optimizer_step


class Classifier(nn.Module):
    """Five 3x3 conv layers (two with stride 2) with GroupNorm and global average pooling, so
    any image size works. GroupNorm, not BatchNorm: no train/eval difference to get wrong."""

    def __init__(self, channels: int, n_classes: int, width: int = 16):
        super().__init__()
        w = width

        def conv(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*conv(channels, w), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w),
                                  *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x):  # (B, C, S, S) -> (B, 4w)
        return self.body(x)

    def forward(self, x):  # -> logits (B, n_classes)
        return self.head(self.body(x))


class Evaluator:
    def __init__(self, net: Classifier, device):
        self.net, self.device = net.to(device).eval(), device

    @torch.inference_mode()
    def _batched(self, fn, x, bs=1024):
        return torch.cat([fn(x[i:i + bs].to(self.device).float()).float().cpu() for i in range(0, len(x), bs)])

    def logits(self, x):
        return self._batched(self.net, x)

    def features(self, x):
        return self._batched(self.net.features, x)

    def accuracy(self, x, y) -> float:
        return (self.logits(x).argmax(1) == y.cpu()).float().mean().item()

    def label_logprob(self, x, y) -> torch.Tensor:
        """log p(y | x) under the evaluator, (B,)."""
        return self.logits(x).log_softmax(1).gather(1, y.cpu()[:, None]).squeeze(1)

    def fd(self, x_a, x_b) -> float:
        """Evaluator Frechet distance between two image sets (our FID stand-in)."""
        return frechet_distance(self.features(x_a), self.features(x_b))


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.
    The symmetric form needs only eigendecompositions of PSD matrices."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = torch.cov(fa.T), torch.cov(fb.T)
    ev, U = torch.linalg.eigh(sa)
    sa_half = U @ torch.diag(ev.clamp(min=0).sqrt()) @ U.T
    cross = torch.linalg.eigvalsh(sa_half @ sb @ sa_half).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross)


def paired_distance(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Distance of unit-normalised features, per pair (B,): 0 same, 2 opposite (LPIPS stand-in)."""
    return (F.normalize(fa, dim=1) - F.normalize(fb, dim=1)).norm(dim=1)


def within_class_diversity(features: torch.Tensor, y: torch.Tensor) -> float:
    """Mean pairwise `paired_distance` of the features (N, d) within each label of y (N,), averaged over
    the labels: 0 when every sample of a class looks the same (a collapsed, reward-hacked model)."""
    per_class = []
    for c in y.unique():
        f = features[y == c]
        i, j = torch.triu_indices(len(f), len(f), 1)
        per_class.append(paired_distance(f[i], f[j]).mean())
    return float(torch.stack(per_class).mean())


def paired_cosine(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per pair (B,) (DINOv2-similarity stand-in)."""
    return F.cosine_similarity(fa, fb, dim=1)


def get_evaluator(dataset: str, size: int, device, steps: int = 300, seed: int = 0,
                  root=None, n_train: int = 20000) -> tuple[Evaluator, float]:
    """The cached evaluator for a dataset and its held-out accuracy."""
    train = data_mod.load(dataset, n_train, size, seed, "train", root)
    test = data_mod.load(dataset, 2000, size, seed, "test", root)
    torch.manual_seed(seed)  # the classifier's init must not depend on what ran before
    net = Classifier(train.channels, train.n_classes)
    cfg = dict(kind="evaluator", version=2, data_version=data_mod.VERSION, dataset=dataset, size=size, steps=steps,
               seed=seed,
               n_train=n_train)

    def fit(net):
        net.to(device).train()
        g = torch.Generator().manual_seed(seed)
        opt = make_optimizer(net, 2e-3)
        x, y = train.images.to(device), train.labels.to(device)
        bar = tqdm(range(steps), desc=f"evaluator ({dataset} {size}px)", leave=False, mininterval=1.0)
        for _ in bar:
            idx = torch.randint(0, len(x), (128,), generator=g).to(device)
            xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g).to(device)  # robust to sampler noise
            loss = F.cross_entropy(net(xb), y[idx])
            optimizer_step(loss, net, opt)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        return {}

    load_or_train("evaluator", cfg, net, fit)
    ev = Evaluator(net, device)
    return ev, ev.accuracy(test.images, test.labels)
