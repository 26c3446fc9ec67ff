"""Benchmark: qkdissect's factored, batched decomposition vs the reference notebook's dense loop and
TransformerLens' FactoredMatrix.svd, and the whole ``qkdissect.dissect()`` against the factored SVD alone, on a
ViT-B/16-shaped model (12 layers × 12 heads, d_model 768, d_head 64, random init), same weights, same process,
same threads. Methods are timed in interleaved rounds (A, B, C, A, B, C, …) so that a change of machine load hits
all of them alike; medians are reported, with the machine's load average.

    python bench/decompose.py [--threads 2] [--rounds 5] [--reference-rounds 1]

What is timed (each produces U, S, V of every head and the per-mode cosines u_k·v_k):
  factored SVD      qkdissect.factored_svd on all 144 heads at once (QR of the thin factors + 64×64 SVDs)
  reference loop    per head, in a Python loop: M = W_qᵀW_k (768×768) in numpy, np.linalg.svd(M), cosines of the
                    first d_head modes — the reference notebooks' method
  dissect (cold)    qkdissect.dissect(): weights extraction, factored SVD, statistics and the 1000-sample
                    Gaussian null computed (null cache off)
  dissect (warm)    the same with the null read from the user cache (qkdissect.cache), as every run after the
                    first on a machine
  TransformerLens   FactoredMatrix(W_qᵀ, W_k).svd() on the same stacked factors, if importable (point
                    QKDISSECT_TL_PATH to `pip install --no-deps --target DIR transformer-lens einops jaxtyping
                    wadler_lindig`: only its FactoredMatrix module is loaded)
Also: the null alone, per sampler (dense / factored / haar), 1000 samples.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
import types

# OpenMP's default wait policy, as users run it: OMP_WAIT_POLICY=PASSIVE (which bench/mine.py sets, for its
# data-loading workers) makes the many small batched LAPACK calls here ~3× slower (factored SVD 0.20 s → 0.70 s).
import numpy as np
import torch


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


def interleaved(methods: dict, rounds: dict[str, int], pause: float = 1.0) -> dict[str, float]:
    """Median seconds per method, timed in interleaved rounds.

    Each call starts after ``pause`` idle seconds: numpy's OpenBLAS workers keep spinning for a while after a call
    and, on 2 cores, slow the next torch call by ~50% (measured: factored SVD 0.20 s → 0.30 s right after numpy
    SVDs), which would charge one method for another's threads.
    """
    times = {name: [] for name in methods}
    for round_ in range(max(rounds.values())):
        for name, fn in methods.items():
            if round_ < rounds[name]:
                time.sleep(pause)
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference-rounds", type=int, default=1)
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["QKDISSECT_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkdissect-bench-cache-")  # a fresh cache

    import timm

    import qkdissect
    from qkdissect import factored_svd, gaussian_null
    from qkdissect.adapters import wrap_model
    from qkdissect.metrics import mode_cosines

    torch.manual_seed(0)
    loaded = wrap_model(timm.create_model(args.model, pretrained=False), spec=f"timm:{args.model} (random init)")
    layers = loaded.adapter.attention_layers()
    W_q = torch.stack([layer.W_q for layer in layers])  # (L, H, d_head, d_model)
    W_k = torch.stack([layer.W_k for layer in layers])
    L, H, d_head, d_model = W_q.shape
    W_q_np, W_k_np = W_q.numpy().astype(np.float32), W_k.numpy().astype(np.float32)
    print(f"model {args.model}: {L} layers × {H} heads, d_model {d_model}, d_head {d_head}; torch {torch.__version__}, "
          f"{args.threads} threads; load average before: {os.getloadavg()[0]:.2f}")

    def factored():
        U, S, V = factored_svd(W_q, W_k)
        return U, S, V, mode_cosines(U, V)

    def reference():
        cosines = np.empty((L, H, d_head), dtype=np.float32)
        for layer in range(L):
            for head in range(H):
                M = W_q_np[layer, head].T @ W_k_np[layer, head]
                U, S, Vh = np.linalg.svd(M)
                cosines[layer, head] = (U[:, :d_head] * Vh[:d_head].T).sum(0)
        return cosines

    def dissect_cold():
        os.environ["QKDISSECT_CACHE"] = "0"
        return qkdissect.dissect(loaded, null_samples=1000)

    def dissect_warm():
        os.environ["QKDISSECT_CACHE"] = "1"
        return qkdissect.dissect(loaded, null_samples=1000)

    dissect_warm()  # fills the cache
    methods = {"factored SVD": factored, "dissect (cold: null computed)": dissect_cold,
               "dissect (warm: null cached)": dissect_warm, "reference loop (numpy dense SVD per head)": reference}
    rounds = {name: args.rounds for name in methods}
    rounds["reference loop (numpy dense SVD per head)"] = args.reference_rounds
    FactoredMatrix = load_factored_matrix()
    if FactoredMatrix is not None:
        methods["TransformerLens FactoredMatrix.svd"] = lambda: FactoredMatrix(W_q.transpose(-1, -2), W_k).svd()
        rounds["TransformerLens FactoredMatrix.svd"] = args.rounds
    else:
        print("TransformerLens not importable: set QKDISSECT_TL_PATH (see docstring) to include it.")
    medians = interleaved(methods, rounds)
    base = medians["factored SVD"]
    print(f"\n{'method':<46}{'median s':>10}{'÷ factored SVD':>16}")
    for name, seconds in medians.items():
        print(f"{name:<46}{seconds:>10.3f}{seconds / base:>16.2f}")
    ref = medians["reference loop (numpy dense SVD per head)"]
    for label in ("dissect (cold: null computed)", "dissect (warm: null cached)"):
        print(f"reference loop ÷ {label}: {ref / medians[label]:.0f}×")
    cos = factored()[3]
    print(f"max |cos difference| factored vs reference: {float((cos - torch.from_numpy(reference())).abs().max()):.2e}")

    nulls = interleaved({method: (lambda method=method: gaussian_null(d_model, d_head, n_samples=1000, method=method,
                                                                       cache=False))
                         for method in ("dense", "factored", "haar")}, {"dense": 1, "factored": 3, "haar": 3})
    print("\nGaussian null alone, 1000 samples (cache off): " +
          ", ".join(f"{name} {seconds:.3f} s" for name, seconds in nulls.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
