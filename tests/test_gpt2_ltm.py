"""GPT-2 with long-term memory (``model.family: gpt2_ltm``) against transformers' own GPT-2: without
the long-term memory the wrapper's NLL is GPT2LMHeadModel's; with it, nothing changes until the first
chunk is written, then the memory is read, its state round-trips bit for bit, rows stay
independent and documents stay apart. A pretrained directory is read from safetensors only."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from models import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.gpt2_ltm import GPT2LTMConfig, GPT2LTMMemory  # noqa: E402
from models.infinite_former import InfiniteFormerConfig  # noqa: E402

V = 41
LTM = InfiniteFormerConfig(n_basis=8, widths=[0.1, 0.3], n_samples=6, n_bins=8, sticky=True, ridge=0.5, tau=0.5)


def make(long_term: bool = True, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(family="gpt2_ltm", n_token=V, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                      dropout=0.1, dropatt=0.1, tgt_len=4, mem_len=4, init_std=0.3,
                      gpt2_ltm=GPT2LTMConfig(long_term=long_term, memory=LTM, **kw))
    return build_model(cfg).eval()


def tokens(batch: int = 3, n: int = 25, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def stream(model, toks, doc_start=None, memory=None):
    memory = model.init_memory(toks.size(0)) if memory is None else memory
    nlls = []
    for i in range(0, toks.size(1) - 1, 4):
        out = model(toks[:, i: i + 4], toks[:, i + 1: i + 5], memory=memory,
                    doc_start=None if doc_start is None else doc_start[:, i: i + 4])
        nlls.append(out.nll)
        memory = out.memory
    return torch.cat(nlls, dim=1), memory


@torch.no_grad()
def test_without_long_term_memory_it_is_gpt2():
    model = make(long_term=False)
    x = tokens(n=9)
    ref = -model.hf(x[:, :-1]).logits.float().log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(model(x[:, :-1], x[:, 1:]).nll, ref, rtol=1e-5, atol=1e-5)
    assert not model.ltm_layers and set(model.init_memory(2).state_dict()) == {"tokens"}


@torch.no_grad()
def test_a_pretrained_directory_is_read_from_safetensors_only(tmp_path):
    source = make(long_term=False, seed=3)
    source.hf.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    loaded = make(long_term=True, seed=9, pretrained=str(tmp_path / "gpt2"))
    x = tokens(n=9)
    plain = source(x[:, :-1], x[:, 1:]).nll
    torch.testing.assert_close(loaded(x[:, :-1], x[:, 1:]).nll, plain, rtol=1e-5, atol=1e-5)   # LTM still empty
    (tmp_path / "gpt2" / "model.safetensors").rename(tmp_path / "gpt2" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        make(pretrained=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="holds no config.json"):
        make(pretrained=str(tmp_path / "nowhere"))


@torch.no_grad()
def test_the_long_term_memory_is_read_after_the_first_write():
    with_ltm, plain = make(long_term=True), make(long_term=False)
    assert all(torch.equal(with_ltm.hf.state_dict()[k], v) for k, v in plain.hf.state_dict().items())
    x = tokens()
    a, mem = stream(with_ltm, x)
    b, _ = stream(plain, x)
    # Segment 2 pushes the first chunk out of the window, segment 3 writes it: the same until then.
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)
    assert mem.coef.shape == (3, 2, 8, 16) and mem.writes.tolist() == [4, 4, 4] and mem.hist.shape == (3, 2, 8)


@torch.no_grad()
def test_memory_round_trips_and_rows_are_independent():
    model = make()
    x = tokens()
    _, mem = stream(model, x[:, :13])
    again = GPT2LTMMemory.from_state_dict({k: v.clone() for k, v in mem.state_dict().items()})
    nxt = x[:, 12:16], x[:, 13:17]
    assert torch.equal(model(*nxt, memory=mem).nll, model(*nxt, memory=again).nll)
    reordered = GPT2LTMMemory.cat([mem.select([2]), mem.select([0, 1])])
    torch.testing.assert_close(model(nxt[0][[2, 0, 1]], nxt[1][[2, 0, 1]], memory=reordered).nll,
                               model(*nxt, memory=mem).nll[[2, 0, 1]], rtol=1e-6, atol=1e-6)
    changed = x.clone()
    changed[1] = tokens(1, seed=7)[0]
    a, b = stream(model, x)[0], stream(model, changed)[0]
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_documents_stay_apart_with_the_long_term_memory():
    model = make()
    x = tokens(n=33)
    starts = torch.zeros(3, 32, dtype=torch.bool)
    starts[0, 13] = starts[1, 16] = starts[2, 5] = True
    base, mem = stream(model, x, starts)
    assert mem.doc_len.tolist() == [32 - 13, 32 - 16, 32 - 5]
    for r, s in enumerate((13, 16, 5)):
        other = x.clone()
        other[r, :s] = tokens(1, n=s, seed=11 + r)[0]
        torch.testing.assert_close(stream(model, other, starts)[0][r, s:], base[r, s:], rtol=1e-5, atol=1e-5)


def test_training_reaches_gpt2_and_the_long_term_memory():
    model = make()
    model.train()
    x = tokens()
    mem = model.init_memory(3)
    for i in range(0, 16, 4):
        out = model(x[:, i: i + 4], x[:, i + 1: i + 5], memory=mem)
        mem = out.memory
    out.objective.backward()
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0          # the KL toward N(mu0, sigma0^2)
    assert model.hf.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ltm[0].parameters())


def test_an_export_needs_no_pretrained_directory(tmp_path):
    """Built from a pretrained directory, exported, the directory deleted: the export rebuilds GPT-2
    from the GPT2Config it stores and gives the same log-probabilities, memory carried."""
    import shutil

    from pipeline.config import load_config, to_dict
    from pipeline.data.tokenizers import ByteTokenizer, save_tokenizer
    from pipeline.export import load_export
    from pipeline.runtime.exports import save_export

    make(long_term=False, seed=3).hf.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    model = make(pretrained=str(tmp_path / "gpt2"))
    tok = ByteTokenizer()
    save_tokenizer(tok, tmp_path / "tok")
    cfg = load_config(None, [])
    cfg.model = model.cfg
    save_export(model, to_dict(cfg), tok, tmp_path / "export",
                {"step": 1, "tag": "global_step1", "mlflow_run_id": None, "manifest_sha256": "x"})
    shutil.rmtree(tmp_path / "gpt2")
    loaded, _, meta = load_export(tmp_path / "export")
    assert meta.family == "gpt2_ltm" and loaded.cfg.gpt2_ltm.pretrained == ""
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(stream(loaded, x)[0], stream(model, x)[0], rtol=0, atol=0)


@torch.no_grad()
def test_generation_carries_both_memories():
    """Greedy sampling through pipeline.generate equals feeding the prompt in blocks and then one
    token at a time by hand, memory (window and long-term) carried throughout."""
    from pipeline.generate import generate

    model = make()
    prompt = tokens(1, n=23, seed=5)[0].tolist()
    got = generate(model, prompt, tokens=6, top_k=1)["ids"]
    seg, lengths = model.generation_lengths()
    memory, out = model.init_memory(1), None
    with model.eval_lengths(**lengths):
        for i in range(0, len(prompt), seg):
            out = model(torch.tensor([prompt[i: i + seg]]), memory=memory, return_logprobs=True)
            memory = out.memory
        mine = []
        for _ in range(6):
            mine.append(int(out.logprobs[0, -1].argmax()))
            out = model(torch.tensor([[mine[-1]]]), memory=memory, return_logprobs=True)
            memory = out.memory
    assert got == mine and int(memory.writes[0]) > 0
