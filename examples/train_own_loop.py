"""Train a torchvision ResNet-18 for a few steps on a finished hakd output, with a loop of your own.

    python examples/train_own_loop.py --out runs/demo --steps 5

The teacher never runs: each batch brings the images under the views the teacher saw, the labels, and
the teacher's targets decoded on the device (docs/api.md). The loss is hakd's own: cross-entropy plus
the PCA and GL terms against the ViT (--teacher vit) or the hint against the CNN (--teacher cnn), read
from the ResNet's layer3 map through torchvision's feature extraction.
"""
import argparse

import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from student_train import open_run

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="runs/demo", help="a finished hakd output (after `hakd train`)")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--teacher", default="vit", choices=["vit", "cnn"])
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

torch.manual_seed(0)
data = open_run(args.out, device=args.device)
print(data)
net = torchvision.models.resnet18(num_classes=data.num_classes)
net.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)  # a stem for 32 px images: layer3 is 8 x 8
net.maxpool = torch.nn.Identity()
model = create_feature_extractor(net, {"layer3": "feature", "fc": "logits"}).to(args.device)
objective = data.objective(args.teacher, student_channels=256)  # CE + kd_lambda (PCA + GL) for the ViT
opt = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=1e-4)

step, epoch = 0, 0
while step < args.steps:
    for batch in data.batches(epoch, args.batch_size, teacher=args.teacher):
        out = model((batch.images - 0.5) / 0.25)  # batch.images: (B, 3, 32, 32) in [0, 1]
        loss, terms = objective(out["logits"], batch.labels, out["feature"], batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"step {step} (epoch {epoch}): loss {loss.item():.3f} = "
              + " + ".join(f"{name} {value.item():.3f}" for name, value in objective.contributions(terms).items()))
        if step == args.steps:
            break
    epoch += 1
