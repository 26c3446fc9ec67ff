"""Benchmark: qkdissect's factored, batched decomposition vs the reference notebook's dense loop
and TransformerLens' FactoredMatrix.svd, on a ViT-B/16-shaped model (12 layers × 12 heads,
d_model 768, d_head 64, random init), same weights, same process, same threads.

    python bench/decompose.py [--threads 2] [--repeats 5] [--reference-repeats 1]

What is timed (each produces U, S, V of every head and the per-mode cosines u_k·v_k):
  qkdissect   factored_svd on all 144 heads at once (QR of the thin factors + 64×64 SVDs)
  reference   per head, in a Python loop: M = W_qᵀW_k (768×768), torch.linalg.svd(M), cosines of the
              first d_head modes (the reference notebooks' method, with torch instead of numpy)
  transformer_lens  FactoredMatrix(W_qᵀ, W_k).svd() on the same stacked factors, if importable.
              Without a full install, point QKDISSECT_TL_PATH to `pip install --no-deps --target DIR
              transformer-lens einops jaxtyping wadler_lindig`: only its FactoredMatrix module is loaded.
Also: the whole `qkdissect.dissect()` (weights extraction, statistics, 1000-sample null).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import types

import torch


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load_factored_matrix():
    try:
        from transformer_lens import FactoredMatrix

        return FactoredMatrix
    except Exception:  # noqa: BLE001 — not installed or its heavy dependencies are missing
        path = os.environ.get("QKDISSECT_TL_PATH")
        if not path or not os.path.isdir(os.path.join(path, "transformer_lens")):
            return None
        sys.path.insert(0, path)
        root = os.path.join(path, "transformer_lens")
        for name, folder in (("transformer_lens", root), ("transformer_lens.utilities", os.path.join(root, "utilities"))):
            module = types.ModuleType(name)
            module.__path__ = [folder]
            sys.modules[name] = module
        return importlib.import_module("transformer_lens.FactoredMatrix").FactoredMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    import qkdissect
    from qkdissect import factored_svd
    from qkdissect.adapters import wrap_model
    from qkdissect.metrics import mode_cosines

    torch.manual_seed(0)
    loaded = wrap_model(timm.create_model(args.model, pretrained=False), spec=f"timm:{args.model} (random init)")
    layers = loaded.adapter.attention_layers()
    W_q = torch.stack([layer.W_q for layer in layers])  # (L, H, d_head, d_model)
    W_k = torch.stack([layer.W_k for layer in layers])
    L, H, d_head, d_model = W_q.shape
    print(f"model {args.model}: {L} layers × {H} heads, d_model {d_model}, d_head {d_head}; "
          f"torch {torch.__version__}, {args.threads} threads")

    def ours():
        U, S, V = factored_svd(W_q, W_k)
        return U, S, V, mode_cosines(U, V)

    def reference():
        cosines = torch.empty(L, H, d_head)
        for layer in range(L):
            for head in range(H):
                M = W_q[layer, head].T @ W_k[layer, head]
                U, S, Vh = torch.linalg.svd(M)
                cosines[layer, head] = (U[:, :d_head] * Vh[:d_head].T).sum(0)
        return cosines

    t_ours, (U, S, V, cos) = timed(ours, args.repeats)
    t_ref, cos_ref = timed(reference, args.reference_repeats)
    # same answer (up to each mode's sign convention, which cancels in u·v)
    agreement = float((cos - cos_ref).abs().max())
    rows = [("qkdissect factored_svd", t_ours, 1.0), ("reference dense loop", t_ref, t_ref / t_ours)]

    FactoredMatrix = load_factored_matrix()
    if FactoredMatrix is not None:
        def transformer_lens():
            U_t, S_t, V_t = FactoredMatrix(W_q.transpose(-1, -2), W_k).svd()
            return U_t, S_t, V_t, (U_t * V_t).sum(-2)

        t_tl, (_, S_tl, _, _) = timed(transformer_lens, args.repeats)
        rows.append(("TransformerLens FactoredMatrix.svd", t_tl, t_tl / t_ours))
        assert torch.allclose(S_tl.float(), S, rtol=1e-3, atol=1e-5)
    else:
        print("TransformerLens not importable: set QKDISSECT_TL_PATH (see docstring) to include it.")

    t_full, atlas = timed(lambda: qkdissect.dissect(loaded), max(1, args.repeats // 2))
    rows.append(("qkdissect.dissect() incl. 1000-sample null", t_full, t_full / t_ours))

    print(f"\n{'method':<44}{'median s':>10}{'× qkdissect':>13}")
    for name, seconds, ratio in rows:
        print(f"{name:<44}{seconds:>10.3f}{ratio:>13.1f}")
    print(f"\nmax |cos difference| qkdissect vs reference: {agreement:.2e}")
    print(f"speed-up over the reference loop: {t_ref / t_ours:.1f}×")


if __name__ == "__main__":
    main()
