"""Sampling from an export with cached memory.

    python -m pipeline.generate --export DIR --prompt "def main(" [--tokens 200 --temperature 0.8
        --top-k 40 --top-p 0.95 --seed 0]          (or --prompt-file F; or generate.* overrides)

The prompt runs through the model in segments of ``tgt_len`` tokens, then every sampled token is
fed alone with the memory of what came before (``CachedLM``). Transformer-XL caches each layer's
hidden states for the last ``mem_len`` positions, so every new token attends over at most
``mem_len + 1`` keys: the cost per token is flat however long the text grows, and the context
reaches back ``mem_len`` positions per layer (the Al-Rfou model keeps its last ``L - 1`` tokens and
recomputes that window for each token: flat too, without the cache). Sampling: temperature, then
top-k, then top-p (nucleus) over the next-token distribution, from a generator seeded with
``seed``: the same seed, prompt and export give the same text.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.config import ConfigError, load_config
from pipeline.evaluation.scoring import eval_lengths, unwrap
from pipeline.runtime.stage import run_stage

log = logging.getLogger("pipeline.generate")


class CachedLM:
    """A model and its memory for one sequence: ``feed(ids)`` returns next-token log-probs."""

    def __init__(self, model, mem_len: int = 0, clamp_len: Optional[int] = None):
        self.model = model
        m = unwrap(model)
        self.device = next(m.parameters()).device
        self.segment, self.lengths = m.generation_lengths(mem_len, clamp_len)
        self.memory = m.init_memory(1, device=self.device)
        self.position = 0                            # tokens fed so far

    @torch.no_grad()
    def feed(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed tokens (in segments), return ``[vocab]`` log-probs for the token after the last."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        if ids.size(1) == 0:
            raise ValueError("feed() needs at least one token")
        logprobs = None
        with eval_lengths(self.model, **self.lengths):
            for i in range(0, ids.size(1), self.segment):
                out = self.model(ids[:, i: i + self.segment], memory=self.memory, return_logprobs=True)
                self.memory = out.memory
                logprobs = out.logprobs[0, -1]
        self.position += ids.size(1)
        return logprobs.float()


def sample(logprobs: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """One token id from ``[vocab]`` log-probs: temperature (0: greedy), top-k, then top-p."""
    if temperature <= 0:
        return int(logprobs.argmax())
    logits = logprobs / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def generate(model, prompt_ids: Sequence[int], tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, mem_len: int = 0, clamp_len: Optional[int] = None) -> dict:
    """``{"ids": new token ids, "step_seconds": per new token}`` after the prompt."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    if tokens < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"tokens={tokens} must be >= 0, top_k={top_k} >= 0, top_p={top_p} in (0, 1]")
    lm = CachedLM(model, mem_len=mem_len, clamp_len=clamp_len)
    gen = torch.Generator().manual_seed(seed)
    logprobs = lm.feed(list(prompt_ids))
    out, times = [], []
    for i in range(tokens):
        tok = sample(logprobs, temperature, top_k, top_p, gen)
        out.append(tok)
        if i + 1 < tokens:
            tic = time.perf_counter()
            logprobs = lm.feed([tok])
            times.append(time.perf_counter() - tic)
    return {"ids": out, "step_seconds": times, "memory_len": _memory_len(lm.memory)}


def _memory_len(memory) -> int:
    t = getattr(memory, "hidden", None)
    if t is None:
        t = getattr(memory, "tokens", None)
    return 0 if t is None else int(t.shape[-2] if t.dim() == 4 else t.shape[-1])


def run(cfg) -> dict:
    """Load the export named by ``cfg.generate``, sample, and return text, ids and timings."""
    from pipeline.runtime.exports import load_export

    g = cfg.generate
    if not g.export:
        raise ConfigError("generate.export (--export DIR) is required: the directory written by pipeline.export")
    if g.prompt and g.prompt_file:
        raise ConfigError("give generate.prompt or generate.prompt_file, not both")
    if g.prompt_file and not Path(g.prompt_file).is_file():
        raise ConfigError(f"generate.prompt_file={g.prompt_file} does not exist (or is not a file); give the path "
                          f"of a UTF-8 text file, or the prompt itself with --prompt")
    try:
        prompt = Path(g.prompt_file).read_text(encoding="utf-8") if g.prompt_file else g.prompt
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"generate.prompt_file={g.prompt_file}: cannot read it as UTF-8 text ({exc})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, meta = load_export(g.export, device=device)
    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    res = generate(model, prompt_ids, g.tokens, g.temperature, g.top_k, g.top_p, g.seed, g.mem_len, g.clamp_len)
    res["prompt_ids"] = prompt_ids
    res["text"] = tokenizer.decode(prompt_ids + res["ids"])
    res["continuation"] = tokenizer.decode(res["ids"])
    res["export"] = {"path": str(g.export), "step": meta.step}
    return res


_FLAGS = {"export": str, "prompt": str, "prompt_file": str, "tokens": int, "temperature": float, "top_k": int,
          "top_p": float, "seed": int, "mem_len": int}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate",
                                     description="sample text from an export with cached memory")
    parser.add_argument("--config", default=None, help="YAML with a generate: section (optional)")
    for name, typ in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                            help=f"generate.{name}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. generate.top_k=40")
    args = parser.parse_args(argv)
    # A model's ValueError (a prompt longer than allowed, a setting it lacks) and an unreadable
    # prompt file are the user's to fix: one line, like the project's own errors.
    return run_stage("generate", lambda: _generate(args), reported=(ValueError, OSError))


def _generate(args) -> None:
    cfg = load_config(args.config, args.overrides)
    for k in _FLAGS:                 # flags win; set directly, so any prompt text passes unparsed
        if getattr(args, k) is not None:
            setattr(cfg.generate, k, getattr(args, k))
    res = run(cfg)
    steps = res["step_seconds"]
    if steps:
        k = max(1, len(steps) // 10)
        log.info("%d tokens; ms per token: first %d %.2f, last %d %.2f; memory %d positions",
                 len(res["ids"]), k, 1e3 * sum(steps[:k]) / k, k, 1e3 * sum(steps[-k:]) / k, res["memory_len"])
    sys.stdout.write(res["text"] + "\n")


if __name__ == "__main__":
    sys.exit(main())
