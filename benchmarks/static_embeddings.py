"""Peak memory of reading GPT-2 XL's input embedding alone, versus the tensor's own size.

Writes a full-size synthetic checkpoint laid out like openai-community/gpt2-xl's model.safetensors
(wte 50257 x 1600 float32 = 322 MB, wpe, and a few transformer blocks with their real shapes), then,
in a fresh subprocess per measurement, records the peak resident set size (VmHWM: ru_maxrss
would inherit the parent's peak across fork + exec) above the baseline after imports, once every
byte of the loaded tensors has been read (safetensors may hand back memory-mapped tensors that
only become resident when touched):
- `load_embedding_matrix` (our loader: only `wte.weight` is read);
- `safetensors.torch.load_file` (the whole checkpoint), for contrast.

Run: python benchmarks/static_embeddings.py [--blocks 4] [--dir /tmp/somewhere]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB, D_MODEL, D_MLP, N_POSITIONS = 50257, 1600, 6400, 1024

MEASURE = r"""
import json, sys
import torch
from safetensors.torch import load_file
from intraneuron.embeddings import load_embedding_matrix

def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith(field + ":")) / 1024

baseline = status_mb("VmRSS")
if sys.argv[2] == "embedding":
    tensors = {"wte.weight": load_embedding_matrix(sys.argv[1])}
else:
    tensors = load_file(sys.argv[1])
loaded = status_mb("VmRSS")
checksum = sum(float(t.sum()) for t in tensors.values())  # read every byte, no copy
print(json.dumps({
    "baseline_mb": baseline, "after_load_mb": loaded, "after_touch_mb": status_mb("VmRSS"),
    "peak_mb": status_mb("VmHWM"), "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile"),
    "loaded_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20,
}))
"""


def write_checkpoint(path: Path, blocks: int) -> int:
    """GPT-2 XL names and shapes (Conv1D weights are [in, out]); returns the file size in bytes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "wte.weight": torch.randn(VOCAB, D_MODEL, generator=g),
        "wpe.weight": torch.randn(N_POSITIONS, D_MODEL, generator=g),
    }
    for i in range(blocks):
        tensors |= {
            f"h.{i}.ln_1.weight": torch.ones(D_MODEL), f"h.{i}.ln_1.bias": torch.zeros(D_MODEL),
            f"h.{i}.attn.c_attn.weight": torch.randn(D_MODEL, 3 * D_MODEL, generator=g),
            f"h.{i}.attn.c_attn.bias": torch.zeros(3 * D_MODEL),
            f"h.{i}.attn.c_proj.weight": torch.randn(D_MODEL, D_MODEL, generator=g),
            f"h.{i}.attn.c_proj.bias": torch.zeros(D_MODEL),
            f"h.{i}.ln_2.weight": torch.ones(D_MODEL), f"h.{i}.ln_2.bias": torch.zeros(D_MODEL),
            f"h.{i}.mlp.c_fc.weight": torch.randn(D_MODEL, D_MLP, generator=g),
            f"h.{i}.mlp.c_fc.bias": torch.zeros(D_MLP),
            f"h.{i}.mlp.c_proj.weight": torch.randn(D_MLP, D_MODEL, generator=g),
            f"h.{i}.mlp.c_proj.bias": torch.zeros(D_MODEL),
        }  # fmt: skip
    tensors |= {"ln_f.weight": torch.ones(D_MODEL), "ln_f.bias": torch.zeros(D_MODEL)}
    save_file(tensors, path)
    return path.stat().st_size


def measure(checkpoint: Path, what: str) -> dict[str, float]:
    repo_root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), what],
        capture_output=True, text=True, check=True, cwd=repo_root,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--blocks", type=int, default=4, help="transformer blocks to write (GPT-2 XL has 48)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        checkpoint = Path(tmp) / "model.safetensors"
        size_mb = write_checkpoint(checkpoint, args.blocks) / 2**20
        print(
            f"checkpoint: {checkpoint.name}, {size_mb:.0f} MB ({args.blocks} blocks + embeddings)"
        )
        for what in ("embedding", "all"):
            r = measure(checkpoint, what)
            extra = r["peak_mb"] - r["baseline_mb"]
            print(
                f"{what:>9}: tensors {r['loaded_mb']:.0f} MB; RSS baseline {r['baseline_mb']:.0f}, "
                f"after load {r['after_load_mb']:.0f}, after reading every byte "
                f"{r['after_touch_mb']:.0f} (anon {r['anon_mb']:.0f} + file-backed {r['file_mb']:.0f}), "
                f"peak {r['peak_mb']:.0f} MB; (peak - baseline) / tensor size = {extra / r['loaded_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
