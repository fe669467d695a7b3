"""The serving engine's lean step (core/lean_decode.py) against transformers' forward.

Both paths run the same rows through the scheduler of core/serve_engine.py: rows of two
random LoRA adapters (different ranks, scalings and target modules) and the base, joining a
running batch at different steps. The lean path must pick the same tokens and produce the
same logits, hold no second copy of the base weights, and stand aside for models it does
not cover."""

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM)

from core import lean_decode
from core.serve_engine import Batch, Engine, Row, Scheduler
from core.serve_worker import BASE_ROW, Sampling

from test_multi_lora import _adapter as random_adapter


@pytest.fixture(scope="module")
def engine(demo_model_path, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("lean")
    engine = Engine(str(demo_model_path))
    engine.add_adapter("wide", random_adapter(demo_model_path, root / "wide", r=16,
                                              lora_alpha=32, target_modules="all-linear"))
    engine.add_adapter("narrow", random_adapter(demo_model_path, root / "narrow", r=4,
                                                lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    return engine


PROMPTS = ["Who are you?", "Tell me a story about a cat who learns to fly.", "Hi",
           "Give three tips for staying healthy.", "What is 2 + 2?", "Name a colour."]
ADAPTERS = ["wide", "narrow", BASE_ROW]


def _decode(engine: Engine, lean, rows_n: int = 9, max_tokens: int = 12) -> list[list[int]]:
    """Greedy replies through the scheduler's own step functions; two rows join every
    step until all have joined, so rows join a batch that is mid-reply."""
    engine.lean = lean
    scheduler = Scheduler(engine, lambda events: None)
    rows = [Row(engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]),
                ADAPTERS[i % 3], Sampling(), max_tokens) for i in range(rows_n)]
    batch, waiting = Batch(), list(rows)
    while waiting or batch.rows:
        joining, waiting = waiting[:2], waiting[2:]
        if lean is not None:
            scheduler._lean_step(batch, joining, [])
        else:
            if joining:
                scheduler._prefill(batch, joining, [])
            scheduler._step(batch, [])
        scheduler._retire(batch, [])
    return [row.tokens for row in rows]


def test_lean_steps_pick_the_tokens_transformers_picks(engine):
    lean = engine.lean
    assert lean is not None and lean.stack is not None  # the demo model and plain LoRA
    try:
        want = _decode(engine, None)
        got = _decode(engine, lean)
    finally:
        engine.lean = lean
    assert got == want
    assert sum(map(len, got)) > 9 * 3  # the rows did write replies
    assert len({tuple(t) for t in want[:3]}) == 3  # same prompt style, three adapters


def test_one_lean_forward_matches_transformers_logits(engine):
    """Running rows of three adapters and two joining prompts in one pass: each row's
    logits equal transformers' for the same row."""
    scheduler = Scheduler(engine, lambda events: None)
    rows = [Row(engine.encode_chat([{"role": "user", "content": p}]), a, Sampling(), 50)
            for p, a in zip(PROMPTS[:3], ADAPTERS)]
    batch = Batch()
    scheduler._lean_step(batch, rows, [])
    for _ in range(3):
        scheduler._lean_step(batch, [], [])
    joining = [Row(engine.encode_chat([{"role": "user", "content": p}]), a, Sampling(), 50)
               for p, a in zip(PROMPTS[3:5], ["narrow", "wide"])]
    import copy
    cache = copy.deepcopy(batch.cache)
    mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
    positions = batch.mask.sum(1).tolist()
    lengths = [len(r.prompt_ids) for r in joining]
    engine.forward_for([r.adapter for r in batch.rows + joining], [1] * 3 + lengths)
    with torch.inference_mode():
        got, _ = engine.lean.forward(batch.next + [t for r in joining for t in r.prompt_ids],
                                     positions + [p for n in lengths for p in range(n)],
                                     3, mask, batch.cache, lengths)
        running = scheduler._forward(torch.tensor(batch.next)[:, None], mask,
                                     torch.tensor(positions)[:, None], cache, batch.rows)
        fresh = [scheduler._forward(torch.tensor([r.prompt_ids]), torch.ones(1, n, dtype=int),
                                    torch.arange(n)[None], None, [r]).logits[0, -1]
                 for r, n in zip(joining, lengths)]
    want = torch.cat([running.logits[:, -1], torch.stack(fresh)])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_fused_weights_replace_the_originals(engine):
    """q|k|v and gate|up are one tensor each, and the modules' weights are views of it:
    serving holds one copy of the base."""
    layer = engine.model.get_base_model().model.layers[0]
    fused, _ = engine.fused[0]["qkv"]
    q = layer.self_attn.q_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    up = layer.mlp.up_proj.base_layer.weight
    assert up.untyped_storage().data_ptr() == engine.fused[0]["gate_up"][0].untyped_storage() \
        .data_ptr()


def test_models_it_does_not_cover_keep_transformers_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not lean_decode.supported(gpt2)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, vocab_size=64)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert lean_decode.supported(llama)
    assert not lean_decode.supported(MistralForCausalLM(MistralConfig(**small,
                                                                      sliding_window=16)))

    class Quantized(torch.nn.Linear):  # what bitsandbytes' layers are to nn.Linear
        pass
    llama.model.layers[0].self_attn.q_proj = Quantized(32, 32, bias=False)
    assert not lean_decode.supported(llama)


def test_a_llama_without_biases_and_with_grouped_heads_matches():
    """A llama (no q/k/v biases, 4 query heads sharing 2 key/value heads, llama3 rope
    scaling): two prompts in one lean pass give transformers' last-token logits."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    llama.eval()
    prompts = [[5, 9, 13, 2, 7], [11, 3, 8]]
    with torch.inference_mode():
        want = [llama(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        lean = lean_decode.LeanDecoder(llama, lean_decode.fuse_base(llama))
        got, kv = lean.forward([t for p in prompts for t in p],
                               [i for p in prompts for i in range(len(p))], 0, None, None,
                               [len(p) for p in prompts])
        after = [llama(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
    assert torch.allclose(got, torch.stack(want), atol=1e-5), (got - torch.stack(want)).abs().max()
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 8, 16)
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(after, want))  # views still work


def test_the_slot_cache_keeps_each_rows_keys_through_joins_steps_and_leaves():
    """Rows join (packed and padded, shorter and longer than the batch, one far longer than
    the buffer's margin), every row gets a token per step, rows leave from the middle: each
    row's unmasked keys and values are always exactly the ones it was given, in order."""
    torch.manual_seed(0)
    heads, dim, layers = 2, 4, 2
    batch, want = Batch(), {}

    def kv(n):
        return [(torch.randn(heads, n, dim), torch.randn(heads, n, dim)) for _ in range(layers)]

    def join(lengths, packed):
        rows = [Row([0] * n, BASE_ROW, Sampling(), 1) for n in lengths]
        parts = [kv(n) for n in lengths]
        for row, part in zip(rows, parts):
            want[id(row)] = part
        if packed:
            batch.join(rows, [0] * len(rows), lengths, packed=[
                (torch.cat([p[i][0] for p in parts], 1)[None],
                 torch.cat([p[i][1] for p in parts], 1)[None]) for i in range(layers)])
        else:
            from transformers.cache_utils import DynamicCache, DynamicLayer
            cache, width = DynamicCache(), max(lengths)
            cache.layers = [DynamicLayer() for _ in range(layers)]
            for i, layer in enumerate(cache.layers):
                layer.keys, layer.values = (torch.stack([
                    torch.cat([torch.zeros(heads, width - n, dim), p[i][j]], 1)
                    for p, n in zip(parts, lengths)]) for j in (0, 1))
            batch.join(rows, [0] * len(rows), lengths, cache=cache)

    def step():
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        new = kv(1)
        for i, layer in enumerate(batch.cache.layers):
            k, v = new[i]
            with torch.inference_mode():  # as in a forward
                    layer.update(k[None].expand(len(batch.rows), -1, -1, -1) * torch.arange(
                    1., len(batch.rows) + 1)[:, None, None, None],
                    v[None].expand(len(batch.rows), -1, -1, -1))
            for r, row in enumerate(batch.rows):
                old = want[id(row)][i]
                want[id(row)][i] = (torch.cat([old[0], k * (r + 1)], 1), torch.cat([old[1], v], 1))

    def check():
        for i, layer in enumerate(batch.cache.layers):
            assert layer.keys.shape[-2] == batch.mask.shape[1]
            for r, row in enumerate(batch.rows):
                real = batch.mask[r].bool()
                assert torch.equal(layer.keys[r][:, real], want[id(row)][i][0])
                assert torch.equal(layer.values[r][:, real], want[id(row)][i][1])
        assert batch.mask[:, 0].any()  # no column of padding that no row needs

    join([3, 5, 2], packed=True)
    step(), step(), check()
    join([9, 1], packed=False)
    step(), check()
    batch.keep([1, 3, 4])  # the first and third leave: the last row moves into a gap
    check()
    step(), check()
    join([200], packed=True)  # longer than every column the buffer has: it is laid out anew
    step(), check()
    for _ in range(250):  # the buffer grows inside a step (in inference mode, as in a forward)
        step()
    batch.keep([3])       # ... and the row that stays moves in it afterwards
    check()
    assert len(batch.rows) == 1 and batch.mask.shape[1] == 451


def test_a_failing_step_ends_its_rows_with_the_error_and_serving_goes_on(engine, monkeypatch):
    """The scheduler thread outlives a step that raises: that step's rows end with the
    error, and rows sent afterwards are served from a fresh batch."""
    import queue
    done = queue.Queue()
    scheduler = Scheduler(engine, lambda out: [done.put(v) for _, kind, v in out
                                               if kind == "done"])
    real, calls = engine.lean.forward, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine.lean, "forward", third_fails)
    scheduler.start()

    def serve(count: int) -> list:
        scheduler.submit([Row(engine.encode_chat([{"role": "user", "content": PROMPTS[i]}]),
                              ADAPTERS[i % 3], Sampling(ignore_eos=True), 6, id=i)
                          for i in range(count)])
        return [done.get(timeout=60) for _ in range(count)]
    failed = serve(3)
    assert [(f[0], f[3]) for f in failed] == [("error", "RuntimeError: boom")] * 3
    assert [(f[0], f[2]) for f in serve(2)] == [("length", 6)] * 2


def test_prompts_that_start_like_earlier_ones_reuse_their_keys_and_reply_the_same(
        engine, monkeypatch):
    """A chat's next turns, the same question to the same adapter, and the same prompt to
    another adapter join running batches with the prefix cache on and off: the replies are
    the same, and the cache did serve most of the later prompts."""
    from core.prefix_cache import PrefixCache
    chat = [{"role": "user", "content": "Give three tips for staying healthy, then name a "
                                        "colour and tell me a story about a cat."}]
    later = chat + [{"role": "assistant", "content": "Eat well, sleep, walk. Blue."},
                    {"role": "user", "content": "Why blue?"}]
    waves = [[(chat, "wide"), (PROMPTS[0:1], "narrow")],
             [(later, "wide"), (chat, "narrow"), (chat, "wide")],
             [(later, "wide"), (PROMPTS[1:2], BASE_ROW)]]

    def replies(cache):
        monkeypatch.setattr(engine, "prefix", cache)
        scheduler = Scheduler(engine, lambda events: None)
        batch, rows = Batch(), []
        for wave in waves:
            joining = [Row(engine.encode_chat(m if isinstance(m[0], dict) else
                                              [{"role": "user", "content": m[0]}]),
                           adapter, Sampling(), 10) for m, adapter in wave]
            rows += joining
            scheduler._lean_step(batch, joining, [])
            for _ in range(3):
                scheduler._lean_step(batch, [], [])
                scheduler._retire(batch, [])
        while batch.rows:
            scheduler._lean_step(batch, [], [])
            scheduler._retire(batch, [])
        return [row.tokens for row in rows]

    cache = PrefixCache(2**20, 4096)
    assert len(engine.encode_chat(later)) > 3 * 16
    assert replies(cache) == replies(None)
    hits = cache.stats()["prefix_cache_hit_tokens"]
    assert hits >= 2 * 16 + 3 * 16 + 2 * 16  # later's turn 1 part, chat again, later again
    monkeypatch.setattr(engine, "prefix", cache)
    assert cache.blocks
    engine.add_adapter("twin", engine.adapters["narrow"])  # any change of adapters empties it
    try:
        assert not cache.blocks
    finally:
        engine.remove_adapter("twin")
