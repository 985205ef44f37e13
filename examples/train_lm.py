"""Train a small byte-level language model with a spec as its attention, and compare specs.

    python examples/train_lm.py [--steps 300] [--seq 256] [--specs softmax performer_causal performer_rpe]

The text is this Python's own standard library sources (read locally, nothing is downloaded). Each
spec becomes `attndsl.nn.MultiheadAttention`, the `self_attn` of every `nn.TransformerEncoderLayer`
(causal), trained from the same initial weights on the same batches; the script prints steps/s and
the held-out loss, and saves the loss curves to examples/results/train_lm.png.
"""
from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from attndsl.nn import MultiheadAttention

HERE = Path(__file__).resolve().parent
SPECS = {                                   # name -> (file, block)
    "softmax": ("softmax.attn", "softmax_causal"),
    "performer_causal": ("performer_causal.attn", "performer_causal"),
    "performer_rpe": ("performer_rpe.attn", "performer_rpe"),
}


def corpus(limit: int = 4_000_000) -> torch.Tensor:
    """Up to `limit` bytes of the standard library's .py files, as a uint8 tensor."""
    data, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_bytes()
        data.append(text)
        size += len(text)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(data)[:limit]), dtype=torch.uint8)


class ByteLM(nn.Module):
    """Embedding -> `layers` causal Transformer encoder layers with `spec` attention -> 256 logits."""

    def __init__(self, spec: tuple[str, str], dim: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, dim), nn.Parameter(torch.zeros(seq, dim))
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            layer.self_attn = MultiheadAttention(str(HERE / spec[0]), dim, heads, batch_first=True, name=spec[1])
            self.layers.append(layer)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)
        self.mask = nn.Transformer.generate_square_subsequent_mask(seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, N) bytes -> (B, N, 256)
        h = self.embed(x) + self.pos[: x.shape[1]]
        mask = self.mask[: x.shape[1], : x.shape[1]]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s: s + seq + 1] for s in start.tolist()]).long()
        yield chunk[:, :-1], chunk[:, 1:]


def train(name: str, args, data: torch.Tensor, held_out: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = ByteLM(SPECS[name], args.dim, args.heads, args.layers, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, stream = [], batches(data, args.batch, args.seq, seed=1)
    model(next(batches(data, 1, args.seq, 2))[0])            # builds the kernels before the clock starts
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  {name:18s} step {step:4d}  loss {loss.item():.3f}  ({math.log2(math.e) * loss.item():.2f} bits/byte)")
    rate = args.steps / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        x, y = next(batches(held_out, 16, args.seq, seed=3))
        test = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return {"losses": losses, "steps_per_s": rate, "held_out": test}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        smooth = torch.tensor(r["losses"]).unfold(0, 10, 1).mean(1) if len(r["losses"]) >= 10 else torch.tensor(r["losses"])
        ax.plot(range(len(smooth)), smooth, label=f"{name} ({r['steps_per_s']:.1f} steps/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte, mean of 10 steps)")
    ax.set_title("byte-level LM on the Python standard library")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "train_lm.png")
    args = ap.parse_args()
    data = corpus()
    split = int(0.95 * len(data))
    print(f"{len(data) / 1e6:.1f} MB of standard-library source; {args.layers} layers, dim {args.dim}, "
          f"{args.heads} heads, batches of {args.batch}x{args.seq} bytes")
    results = {name: train(name, args, data[:split], data[split:]) for name in args.specs}
    print("\n| spec | steps/s | final training loss | held-out loss (nats/byte) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps_per_s']:.2f} | {sum(r['losses'][-10:]) / len(r['losses'][-10:]):.3f} "
              f"| {r['held_out']:.3f} |")
    plot(results, args.plot)
    print(f"\nloss curves: {args.plot}")


if __name__ == "__main__":
    main()
