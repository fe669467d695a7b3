"""The serving engine's prefix cache (core/prefix_cache.py): blocks are found only after the
same prefix and adapter, the last prompt token is always computed, the least recently used
prompt loses its end first, and a collision of names is a miss."""

import torch

from core import prefix_cache
from core.prefix_cache import BLOCK, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4
PER_TOKEN = 2 * LAYERS * HEADS * DIM * 4


def _kv(tokens: list[int]) -> list[tuple]:
    """Keys and values that name their token: every entry of position i is tokens[i]."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(HEADS, -1, DIM)
    return [(t + layer, -t - layer) for layer in range(LAYERS)]


def _found_tokens(blocks) -> list[int]:
    return [t for b in blocks for t in b.tokens]


def test_a_prompt_finds_the_blocks_of_its_prefix_and_computes_at_least_its_last_token():
    cache = PrefixCache(2**20, PER_TOKEN)
    prompt = list(range(100, 140))                          # 40 tokens: two full blocks
    assert cache.lookup("a", prompt) == []
    cache.store("a", prompt, _kv(prompt))
    assert len(cache.blocks) == 2

    again = cache.lookup("a", prompt)
    assert _found_tokens(again) == prompt[:2 * BLOCK]
    keys, values = prefix_cache.joined(again)[1]
    assert torch.equal(keys, _kv(prompt)[1][0][:, :2 * BLOCK])
    assert torch.equal(values, _kv(prompt)[1][1][:, :2 * BLOCK])

    assert len(cache.lookup("a", prompt[:2 * BLOCK])) == 1    # its last token is computed
    assert len(cache.lookup("a", prompt[:2 * BLOCK + 1])) == 2
    assert len(cache.lookup("a", prompt + [7, 8, 9])) == 2    # the next turn of a chat
    changed = prompt[:20] + [0] + prompt[21:]
    assert len(cache.lookup("a", changed)) == 1                # only the block before the change
    assert cache.lookup("b", prompt) == []                     # another adapter's keys differ
    assert cache.hit_tokens == BLOCK * (2 + 1 + 2 + 2 + 1)
    assert cache.stats()["prompt_tokens"] == 40 * 4 + 32 + 33 + 43


def test_the_least_recently_used_prompt_loses_its_end_first():
    cache = PrefixCache(3 * BLOCK * PER_TOKEN, PER_TOKEN)     # room for three blocks
    first, second = list(range(0, 33)), list(range(500, 533))
    cache.store("a", first, _kv(first))
    cache.store("a", second, _kv(second))
    assert len(cache.blocks) == 3
    assert len(cache.lookup("a", first + [1])) == 1           # its first block stayed
    assert len(cache.lookup("a", second + [1])) == 2


def test_a_block_of_another_prefix_under_the_same_name_is_a_miss(monkeypatch):
    cache = PrefixCache(2**20, PER_TOKEN)
    prompt = list(range(40))
    monkeypatch.setattr(prefix_cache, "hash", lambda value: 1, raising=False)  # every name collides
    cache.store("a", prompt, _kv(prompt))
    assert len(cache.blocks) == 1
    assert cache.lookup("a", list(range(1, 41))) == []        # same name, other tokens
    assert len(cache.lookup("a", prompt)) == 1


def test_a_cache_of_no_memory_keeps_nothing():
    cache = PrefixCache(0, PER_TOKEN)
    cache.store("a", list(range(40)), _kv(list(range(40))))
    assert not cache.blocks
