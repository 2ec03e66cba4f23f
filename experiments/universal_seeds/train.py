"""Train several small GPT-2-style causal LMs on the default corpus, one per seed (offline, CPU).

For the universal-neurons study (Gurnee et al. 2024 compare GPT-2 models that differ only by their
training seed). Every model shares ONE byte-level BPE tokenizer trained here on the corpus, so their
tokenizer fingerprints are equal, and is saved as a local directory that the framework loads with
`model.source=<dir>` (config.json, model.safetensors, tokenizer.json + tokenizer_config.json).

    .venv/bin/python experiments/universal_seeds/train.py --out .cache/seed_models --seeds 0 1 2

What the seed controls: the weight initialisation and (by default) the order of the training
batches. `--data-seed N` fixes the batch order for every model, so that only the init differs.
The validation slice (every `--val-every`-th block of the token stream) is the same for all seeds.
Given the seed, the thread count and the device, a run is deterministic (bit-identical weights).

Output: `<out>/seed<N>/` per model (with `training.json`: settings, losses, timings) and
`<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

EOS = "<|endoftext|>"
TRAINING_FILE = "training.json"


# --- data --------------------------------------------------------------------------------------


def load_corpus(source: str = "gutenberg") -> list[str]:
    """The documents of a framework corpus source (default: the project's default corpus)."""
    from intraneuron.corpus.sources import load_source

    return list(load_source(source))


def train_tokenizer(documents: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2):
    """A GPT-2-style byte-level BPE (no normaliser, no prefix space) with `<|endoftext|>` as its
    BOS/EOS token, wrapped as a `PreTrainedTokenizerFast`. Deterministic given the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS)


def encode_corpus(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """One token stream: every document's ids with EOS between documents (as the framework's
    corpus windows do)."""
    stream: list[int] = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if ids:
            if stream:
                stream.append(tokenizer.eos_token_id)
            stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


def split_blocks(
    stream: torch.Tensor, block_len: int, val_every: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into non-overlapping blocks of `block_len` + 1 tokens (inputs + shifted
    targets); every `val_every`-th block is held out for validation. Same split for every seed."""
    n_blocks = len(stream) // (block_len + 1)
    if n_blocks < 2:
        raise ValueError(f"{len(stream)} tokens make fewer than 2 blocks of {block_len + 1}")
    blocks = stream[: n_blocks * (block_len + 1)].view(n_blocks, block_len + 1)
    is_val = torch.arange(n_blocks) % val_every == val_every - 1
    if not is_val.any():
        is_val[-1] = True
    return blocks[~is_val], blocks[is_val]


# --- model -------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    n_layer: int = 3
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 256
    batch_size: int = 4
    tokens: int = 1_500_000  # training tokens seen (batch_size * n_positions per step)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    data_seed: int | None = None  # None: the model seed also orders the batches
    eval_every: int = 0  # steps between validation evaluations (0: only before and after)
    log_every: int = 50

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.n_positions))


@dataclass
class TrainResult:
    seed: int
    steps: int
    tokens_seen: int
    elapsed_s: float
    tokens_per_s: float
    val_loss_init: float
    val_loss: float
    train_losses: list[float] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)


def build_model(settings: TrainSettings, vocab_size: int, eos_id: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=settings.dropout,
        embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) over the blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def _batch_order(n_train: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Block indices for every step: epochs of seeded permutations, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    orders = [torch.randperm(n_train, generator=generator) for _ in range(-(-needed // n_train))]
    return torch.cat(orders)[:needed].view(steps, batch_size)


def train_model(
    seed: int,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    vocab_size: int,
    eos_id: int,
    settings: TrainSettings,
    device: str | torch.device = "cpu",
    log=print,
):
    """Train one model from `seed`; returns (model on CPU, TrainResult)."""
    device = torch.device(device)
    if train_blocks.size(1) != settings.n_positions + 1:
        raise ValueError(f"blocks hold {train_blocks.size(1)} tokens, need n_positions + 1")
    model = build_model(settings, vocab_size, eos_id, seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95),
    )
    steps = settings.steps
    warmup = min(settings.warmup_steps, max(1, steps // 10))

    def lr_factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data_seed = seed if settings.data_seed is None else settings.data_seed
    order = _batch_order(len(train_blocks), steps, settings.batch_size, data_seed)
    eval_batch = max(settings.batch_size, 32)

    val_init = evaluate(model, val_blocks, eval_batch, device)
    val_curve = [(0, val_init)]
    log(f"seed {seed}: {steps} steps of {settings.batch_size}x{settings.n_positions} tokens, "
        f"val loss at init {val_init:.3f} (log V = {math.log(vocab_size):.3f})")
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = train_blocks[order[step]].to(device)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach().item())
        done = step + 1
        if settings.eval_every and done % settings.eval_every == 0 and done < steps:
            val_curve.append((done, evaluate(model, val_blocks, eval_batch, device)))
        if settings.log_every and (done % settings.log_every == 0 or done == steps):
            rate = done * batch.numel() / (time.perf_counter() - started)
            log(f"  seed {seed} step {done}/{steps}  train loss {sum(losses[-settings.log_every:]) / len(losses[-settings.log_every:]):.3f}  {rate:,.0f} tok/s")
    elapsed = time.perf_counter() - started
    val_loss = evaluate(model, val_blocks, eval_batch, device)
    val_curve.append((steps, val_loss))
    tokens_seen = steps * settings.batch_size * settings.n_positions
    result = TrainResult(
        seed=seed, steps=steps, tokens_seen=tokens_seen, elapsed_s=elapsed,
        tokens_per_s=tokens_seen / elapsed, val_loss_init=val_init, val_loss=val_loss,
        train_losses=losses, val_curve=val_curve,
    )
    log(f"seed {seed}: val loss {val_init:.3f} -> {val_loss:.3f} (ppl {math.exp(val_loss):.1f}), "
        f"{elapsed:.1f} s, {result.tokens_per_s:,.0f} tok/s")
    return model.to("cpu").eval(), result


def save_model(model, tokenizer, directory: Path, metadata: dict | None = None) -> Path:
    """Write weights (model.safetensors), config.json, the tokenizer files and `training.json`
    into `directory`, atomically (a sibling staging directory renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(str(staging))  # transformers >= 5 always writes safetensors
        tokenizer.save_pretrained(str(staging))
        if metadata is not None:
            (staging / TRAINING_FILE).write_text(json.dumps(metadata, indent=1))
        for written in staging.iterdir():
            written.chmod(0o644)  # some writers create private files
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for seed<N>/ model dirs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpus", default="gutenberg", help="framework corpus source")
    parser.add_argument("--max-chars", type=int, default=None, help="use only this many characters of the corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="training tokens per model")
    parser.add_argument("--layers", type=int, default=defaults.n_layer)
    parser.add_argument("--width", type=int, default=defaults.n_embd, help="d_model (d_mlp = 4x)")
    parser.add_argument("--heads", type=int, default=defaults.n_head)
    parser.add_argument("--ctx", type=int, default=defaults.n_positions)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--data-seed", type=int, default=None,
                        help="fix the batch order for all models (default: each model's seed)")
    parser.add_argument("--val-every", type=int, default=40, help="hold out every N-th block")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[TrainResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    settings = TrainSettings(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.ctx,
        batch_size=args.batch_size, tokens=args.tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, dropout=args.dropout,
        data_seed=args.data_seed, eval_every=args.eval_every, log_every=args.log_every,
    )
    total_started = time.perf_counter()
    documents = load_corpus(args.corpus)
    if args.max_chars is not None:
        documents = _truncate(documents, args.max_chars)
    started = time.perf_counter()
    tokenizer = train_tokenizer(documents, args.vocab_size)
    print(f"tokenizer: vocab {len(tokenizer)} trained on {sum(map(len, documents)):,} characters "
          f"in {time.perf_counter() - started:.1f} s")
    stream = encode_corpus(tokenizer, documents)
    train_blocks, val_blocks = split_blocks(stream, settings.n_positions, args.val_every)
    print(f"corpus {args.corpus!r}: {len(stream):,} tokens; {len(train_blocks)} train / "
          f"{len(val_blocks)} validation blocks of {settings.n_positions}; "
          f"{settings.steps} steps = {settings.steps * settings.batch_size * settings.n_positions / (len(train_blocks) * settings.n_positions):.2f} epochs; "
          f"device {device}, {torch.get_num_threads()} threads")

    results = []
    for seed in args.seeds:
        model, result = train_model(
            seed, train_blocks, val_blocks, len(tokenizer), tokenizer.eos_token_id, settings, device
        )
        metadata = {
            "seed": seed,
            "data_seed": seed if settings.data_seed is None else settings.data_seed,
            "corpus": args.corpus,
            "max_chars": args.max_chars,
            "corpus_tokens": len(stream),
            "train_blocks": len(train_blocks),
            "val_blocks": len(val_blocks),
            "val_every": args.val_every,
            "vocab_size": len(tokenizer),
            "settings": asdict(settings),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "result": {k: v for k, v in asdict(result).items() if k != "train_losses"},
            "train_losses": [round(x, 4) for x in result.train_losses],
        }
        path = save_model(model, tokenizer, args.out / f"seed{seed}", metadata)
        print(f"saved {path}")
        results.append(result)

    summary = {
        "models": {f"seed{r.seed}": str((args.out / f"seed{r.seed}").resolve()) for r in results},
        "results": [{k: v for k, v in asdict(r).items() if k not in ("train_losses", "val_curve")}
                    for r in results],
        "total_s": time.perf_counter() - total_started,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'seed':>4} {'steps':>6} {'time s':>8} {'tok/s':>8} {'val init':>9} {'val loss':>9}")
    for r in results:
        print(f"{r.seed:>4} {r.steps:>6} {r.elapsed_s:>8.1f} {r.tokens_per_s:>8,.0f} "
              f"{r.val_loss_init:>9.3f} {r.val_loss:>9.3f}")
    print(f"total {summary['total_s']:.1f} s")
    return results


def _truncate(documents: Sequence[str], max_chars: int) -> list[str]:
    kept, left = [], max_chars
    for document in documents:
        if left <= 0:
            break
        kept.append(document[:left])
        left -= len(kept[-1])
    return kept


if __name__ == "__main__":
    main()
