"""Many LoRA adapters in one batch: each row gets its own adapter for the cost of one.

Why by hand: PEFT serves a mixed batch (`adapter_names=`) by running every adapter's rows
as a separate sub-batch in every adapted layer. On the demo model a decoding step of 8 rows
then costs about 13 ms, against 5 ms for the plain base. Here the adapters' A matrices are
laid side by side ([in, N*r]) and their B matrices stacked ([N*r, out], scaled), so a
layer adds `((x @ A) * mask) @ B` with a per-row 0/1 mask that keeps only the row's own
adapter's columns: three small ops whatever the mix (the idea of Punica's and S-LoRA's
batched kernels, in plain torch). The cost grows with the number of adapters served
(N*r columns), which stays small next to the base matmul for the tens of adapters a
workbench serves. PEFT still loads, checks and holds the adapters; only its forward in
the adapted layers is replaced while the stack is installed.

Only plain LoRA on `nn.Linear` layers is stacked. Anything else (DoRA, LoRA on embeddings,
`modules_to_save`, a LoRA bias) leaves PEFT's own mixed-batch path in charge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the serving HTTP process
    import torch   # reads BASE without it

BASE = "__base__"   # the row uses no adapter (PEFT's own name for it in a mixed batch)


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def stackable(model, names: list[str]) -> bool:
    """Whether every served adapter is plain LoRA on Linear layers (see the module doc)."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    config = getattr(model, "peft_config", {})
    for name in names:
        c = config.get(name)
        if c is None or getattr(c, "use_dora", False) or getattr(c, "lora_bias", False) \
                or getattr(c, "modules_to_save", None) or getattr(c, "trainable_token_indices", None):
            return False
    return all(type(m) is LoraLinear and isinstance(m.base_layer, torch.nn.Linear)
               for m in lora_layers(model))


class StackedLora:
    """The served adapters stacked per layer, installed as the adapted layers' forward.

    `select(names)` sets which adapter each row of the next forward uses (one name per row,
    BASE for none); a batch of base rows only skips the adapter math entirely."""

    def __init__(self, model, names: list[str]):
        self.names = list(names)
        self.rank = max(_rank(m, n) for m in lora_layers(model) for n in names
                        if n in m.lora_A)
        self.mask: torch.Tensor | None = None
        self._key: tuple | None = None
        self.layers = lora_layers(model)
        self.stacked: dict[int, tuple] = {}    # id(layer) -> its (A, B)
        for layer in self.layers:
            a, b = self._stack(layer)
            self.stacked[id(layer)] = (a, b)
            layer.forward = _forward(layer.base_layer, a, b, self)

    def _stack(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """[in, N*r] and [N*r, out]: adapter j in columns j*r..(j+1)*r, zero where the
        adapter does not touch this layer or has a smaller rank."""
        import torch
        base = layer.base_layer.weight
        n, r = len(self.names), self.rank
        a = torch.zeros(base.shape[1], n * r, dtype=base.dtype, device=base.device)
        b = torch.zeros(n * r, base.shape[0], dtype=base.dtype, device=base.device)
        for j, name in enumerate(self.names):
            if name in layer.lora_A:
                ra = layer.lora_A[name].weight  # [r_j, in]
                a[:, j * r:j * r + ra.shape[0]] = ra.t()
                b[j * r:j * r + ra.shape[0]] = (layer.lora_B[name].weight.t()
                                                * layer.scaling[name])
        return a, b

    def fused(self, modules) -> tuple | None:
        """(A, blocks, k) for k projections of one input run as one (core/lean_decode.py):
        the modules' stacked A side by side, so one x@A serves all k, and each touched
        module's stacked B as (columns of x@A, columns of the output, B). B stays one block
        per module, not one block-diagonal matrix: the zeros off the diagonal were a third
        of the adapters' arithmetic on the demo model (2/3 of q|k|v's, 1/2 of gate|up's).
        None when no adapter touches any of the modules."""
        import torch
        pairs = [self.stacked.get(id(m)) for m in modules]
        if all(p is None for p in pairs):
            return None
        width, ref = len(self.names) * self.rank, _linear(modules[0]).weight
        a = torch.zeros(ref.shape[1], width * len(modules), dtype=ref.dtype, device=ref.device)
        blocks, start = [], 0
        for j, (pair, module) in enumerate(zip(pairs, modules)):
            out = _linear(module).out_features
            if pair is not None:
                a[:, j * width:(j + 1) * width] = pair[0]
                blocks.append((slice(j * width, (j + 1) * width), slice(start, start + out),
                               pair[1]))
            start += out
        return a, blocks, len(modules)

    def select(self, rows: list[str], lengths: list[int] | None = None) -> None:
        """One adapter name per row of the next forward. With `lengths`, the forward is one
        packed row of several prompts end to end, and prompt i (lengths[i] tokens) uses
        rows[i]."""
        import torch
        key = (tuple(rows), tuple(lengths or ()))
        if key == self._key:
            return
        self._key = key
        if all(name == BASE for name in rows):
            self.mask = None
            return
        r = self.rank
        columns = torch.zeros(len(rows), len(self.names) * r)
        for i, name in enumerate(rows):
            if name != BASE:
                j = self.names.index(name)
                columns[i, j * r:(j + 1) * r] = 1
        mask = (columns.repeat_interleave(torch.tensor(lengths), dim=0)[None] if lengths
                else columns[:, None])               # [1, tokens, N*r] or [rows, 1, N*r]
        weight = self.layers[0].base_layer.weight
        self.mask = mask.to(weight.device, weight.dtype)

    def remove(self) -> None:
        """Give the layers back their PEFT forward."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers = []


def _linear(module):
    return getattr(module, "base_layer", module)


def _rank(layer, name: str) -> int:
    return layer.lora_A[name].weight.shape[0]


def _forward(linear, a: torch.Tensor, b: torch.Tensor, stack: StackedLora):
    import torch
    weight, bias = linear.weight, linear.bias

    def forward(x, *args, **kwargs):
        out = torch.nn.functional.linear(x, weight, bias)
        if stack.mask is None:
            return out
        h = (x @ a) * stack.mask                      # [rows, T, N*r], others' columns zeroed
        return out.add_(h @ b)
    return forward
