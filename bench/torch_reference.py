"""Diagnostic for issue 4's GPU figure: airbench94's recipe in plain PyTorch, on *our* split.

The Keras port (training/model/network.py, training/model/jax_loop.py) reaches ~89.5% on the JPEG
archive where airbench94 reports 94% on the official CIFAR-10 binaries. This script
asks whether the gap is the port or the data: it trains the published recipe (written
here from its description: whitening stem, Dirac-initialised conv groups, BatchNorm
with frozen scale, Nesterov SGD with airbench's kilostep scaling and 64x bias rate,
label smoothing 0.2, Lookahead, 9.9 epochs at batch 1024, flip + 2-pixel reflect
translate, whitening bias trained for 3 epochs) in PyTorch, on exactly the split that
``bench/bench_train.py`` uses (same ``training.data.prepare``, same config overrides), and
prints test accuracy without and with mirror TTA.

It is not part of the product (which is Keras, backend-neutral); it runs only where
PyTorch and a GPU are, i.e. on the lent GPU machine:

    python3 -m bench.torch_reference --archive .gpu/cifar10-train-jpeg.zip --set val_fraction=0.02
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def build(torch, nn, widths=(64, 256, 256)):
    """airbench94's net: 2x2 whitening conv (24 ch) + GELU, three conv groups, max-pool, linear / 9."""

    class BN(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c, eps=1e-12, momentum=0.4)  # PyTorch momentum = weight of the new batch
            self.weight.requires_grad = False

    def conv(cin, cout):
        layer = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
        with torch.no_grad():
            nn.init.dirac_(layer.weight[:cin])
        return layer

    def group(cin, cout):
        return nn.Sequential(conv(cin, cout), nn.MaxPool2d(2), BN(cout), nn.GELU(),
                             conv(cout, cout), BN(cout), nn.GELU())

    class Scale(nn.Module):
        def forward(self, x):
            return x / 9

    return nn.Sequential(nn.Conv2d(3, 24, 2, bias=True), nn.GELU(), group(24, widths[0]),
                         group(widths[0], widths[1]), group(widths[1], widths[2]), nn.MaxPool2d(3),
                         nn.Flatten(), nn.Linear(widths[2], 10, bias=False), Scale())


def whiten_init(torch, layer, images, eps=5e-4):
    """Eigenvectors of the (uncentred) 2x2 patch covariance, scaled by 1/sqrt(lambda + eps), both signs."""
    c, h, w = layer.weight.shape[1:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    flat = patches.view(len(patches), -1)
    values, vectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    values, vectors = values.flip(0).view(-1, 1, 1, 1), vectors.T.reshape(-1, c, h, w).flip(0)
    scaled = vectors / torch.sqrt(values + eps)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([scaled, -scaled]))
        layer.bias.zero_()


def main(argv=None) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from training.config import load_config
    from training.model.network import CIFAR_MEAN, CIFAR_STD
    from training.data.prepare import load_prepared, prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--state", type=Path, default=Path("/tmp/torch-reference-state"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--epochs", type=float, default=9.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = load_config({"recipe": "airbench94", "state_dir": str(args.state), "test_fraction": 0.2,
                          "data_url": args.archive.resolve().as_uri(), **dict(s.split("=", 1) for s in args.set)})
    splits, _ = load_prepared(prepare(args.archive, config))
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    mean = torch.tensor(CIFAR_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=dev).view(1, 3, 1, 1)

    def tensor(x):
        return ((torch.tensor(x, device=dev).permute(0, 3, 1, 2).float() / 255) - mean) / std

    x_train, y_train = tensor(splits["train"][0]), torch.tensor(splits["train"][1], device=dev).long()
    x_test, y_test = tensor(splits["test"][0]), torch.tensor(splits["test"][1], device=dev).long()
    model = build(torch, nn).to(dev).to(memory_format=torch.channels_last)
    whiten_init(torch, model[0], x_train[torch.randperm(len(x_train), device=dev)[:5000]])

    batch, momentum = 1024, 0.85
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / kilostep, 0.0153 * batch / kilostep
    lr_bias = lr * 64
    norm_biases = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1 and n != "0.bias"]
    others = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    whiten_bias = [model[0].bias]
    groups = [dict(params=norm_biases + whiten_bias, lr=lr_bias, weight_decay=wd / lr_bias),
              dict(params=others, lr=lr, weight_decay=wd / lr)]
    opt = torch.optim.SGD(groups, momentum=momentum, nesterov=True)
    for g in opt.param_groups:
        g["base"] = g["lr"]
    steps_per_epoch = len(x_train) // batch
    total = math.ceil(steps_per_epoch * args.epochs)
    schedule = np.interp(np.arange(1 + total), [0, int(0.2 * total), total], [0.2, 1, 0.07])
    alpha = 0.95 ** 5 * (np.arange(total + 1) / total) ** 3
    slow = {k: v.clone() for k, v in model.state_dict().items()}

    def lookahead(decay):
        for (k, s), v in zip(slow.items(), model.state_dict().values()):
            if v.dtype.is_floating_point:
                s.lerp_(v, 1 - decay)
                v.copy_(s)

    padded = F.pad(x_train, (2, 2, 2, 2), mode="reflect")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    torch.cuda.synchronize()
    start, step = time.monotonic(), 0
    while step < total:
        model.train()
        whiten_bias[0].requires_grad = step < 3 * steps_per_epoch
        order = torch.randperm(len(x_train), device=dev)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * batch:(i + 1) * batch]
            src = padded[idx]
            shifts = torch.randint(0, 5, (len(idx), 2), device=dev)
            images = torch.empty(len(idx), 3, 32, 32, device=dev)
            for dy in range(5):
                for dx in range(5):
                    m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                    images[m] = src[m, :, dy:dy + 32, dx:dx + 32]
            flip = torch.rand(len(idx), device=dev) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(images.contiguous(memory_format=torch.channels_last)), y_train[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = g["base"] * schedule[step]
            opt.step()
            step += 1
            if step % 5 == 0:
                with torch.no_grad():
                    lookahead(alpha[step])
    with torch.no_grad():
        lookahead(1.0)
    torch.cuda.synchronize()
    seconds = time.monotonic() - start
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = torch.cat([model(x) for x in x_test.split(2000)]).float()
        mirror = torch.cat([model(x.flip(-1)) for x in x_test.split(2000)]).float()
    acc0 = (plain.argmax(1) == y_test).float().mean().item()
    acc1 = ((plain + mirror).argmax(1) == y_test).float().mean().item()
    print(f"TORCH_REFERENCE train={len(x_train)} test={len(x_test)} epochs={args.epochs} steps={total} "
          f"seconds={seconds:.1f} (incl. first-call warm-up) test_accuracy={acc0:.4f} "
          f"test_accuracy_mirror_tta={acc1:.4f} seed={args.seed}", flush=True)


if __name__ == "__main__":
    main()
