"""Prefix caching for `tunebench serve`: a prompt that begins like an earlier one skips that part.

Why: the next turn of a chat sends the whole conversation again, and many requests share a
system prompt or a few-shot preamble; their keys and values were computed before. As in
vLLM's automatic prefix caching, prompts are cut into blocks of BLOCK tokens, and a block is
named by its adapter, its tokens and the block before it, so it is found only after the same
prefix. A joining prompt takes its longest run of cached blocks, always leaving at least its
last token to compute (its logits pick the first reply token), and computes only the rest.

Keys and values depend on the adapter, so the adapter is part of a block's name, and any
change of the adapters served empties the cache (a name may come back with other weights).
A block keeps its tokens and its parent's name, and a lookup checks both: a hash collision is
a miss, never another prompt's keys. The least recently used blocks go when the cache is over
its budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BLOCK = 16   # tokens per cached block (vLLM's default)


@dataclass
class Block:
    parent: int | None
    tokens: tuple[int, ...]
    kv: list[tuple]              # per layer: (keys, values), each [kv_heads, BLOCK, head_dim]


class PrefixCache:
    """Blocks of prompts' keys and values, by name, least recently used first."""

    def __init__(self, max_bytes: int, bytes_per_token: int):
        self.max_blocks = max_bytes // max(1, bytes_per_token * BLOCK)
        self.blocks: OrderedDict[int, Block] = OrderedDict()
        self.hit_tokens = 0      # prompt tokens taken from the cache (for /health)
        self.prompt_tokens = 0   # prompt tokens that joined

    def lookup(self, adapter: str, tokens: list[int]) -> list[Block]:
        """The cached blocks that start `tokens`, its last token always left out."""
        found, names, parent = [], [], None
        for name, part in _named_blocks(adapter, tokens[:len(tokens) - 1]):
            block = self.blocks.get(name)
            if block is None or block.parent != parent or block.tokens != part:
                break
            found.append(block)
            names.append(name)
            parent = name
        self._touch(names)
        self.prompt_tokens += len(tokens)
        self.hit_tokens += BLOCK * len(found)
        return found

    def store(self, adapter: str, tokens: list[int], kv: list[tuple]) -> None:
        """Keep the full blocks of a prompt whose keys and values were just computed
        (`kv`: per layer, [kv_heads, len(tokens), head_dim] each)."""
        if not self.max_blocks:
            return
        names, parent = [], None
        for i, (name, part) in enumerate(_named_blocks(adapter, tokens)):
            if name not in self.blocks:
                span = slice(i * BLOCK, (i + 1) * BLOCK)
                self.blocks[name] = Block(parent, part, [(k[:, span].clone(), v[:, span].clone())
                                                         for k, v in kv])
            names.append(name)
            parent = name
        self._touch(names)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def _touch(self, names: list[int]) -> None:
        """Mark a prompt's blocks as just used, its first block last: the least recently
        used prompt then loses its end first, and what stays is still a usable prefix."""
        for name in reversed(names):
            self.blocks.move_to_end(name)

    def clear(self) -> None:
        self.blocks.clear()

    def stats(self) -> dict:
        return {"prefix_cache_blocks": len(self.blocks),
                "prefix_cache_hit_tokens": self.hit_tokens,
                "prompt_tokens": self.prompt_tokens}


def _named_blocks(adapter: str, tokens: list[int]):
    """(name, tokens) of each full block of `tokens`; a name covers everything before it."""
    name = hash(("tunebench-prefix", adapter))
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        part = tuple(tokens[start:start + BLOCK])
        name = hash((name, part))
        yield name, part


def joined(blocks: list[Block]) -> list[tuple] | None:
    """Per layer, the blocks' keys and values end to end ([kv_heads, tokens, head_dim])."""
    import torch
    if not blocks:
        return None
    return [(torch.cat([b.kv[i][0] for b in blocks], dim=1),
             torch.cat([b.kv[i][1] for b in blocks], dim=1)) for i in range(len(blocks[0].kv))]
