"""Module: a tree of named parameters whose dotted paths equal HF checkpoint keys.

Attributes that are Tensors are parameters, attributes that are Modules are children, in the
order they were set. No hooks and no globals: walking `vars(self)` is the whole mechanism, so
`model.layers.0.self_attn.q_proj.weight` is found by the same loop that saves and loads it.
"""
from __future__ import annotations

from ..autograd.tensor import Tensor
from ..errors import MiniPeftError


class Module:
    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- walking the tree ----------------------------------------------------------------
    def named_children(self):
        for name, v in vars(self).items():
            if isinstance(v, Module):
                yield name, v

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = ""):
        """Each parameter once, under the first path that reaches it (a tied lm_head.weight is
        reported as model.embed_tokens.weight, as transformers saves it)."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, v in vars(mod).items():
                if isinstance(v, Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    yield (f"{mod_name}.{name}" if mod_name else name), v

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict:
        """{name: Tensor} of the parameters that require a gradient, in named_parameters order."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        """{dotted name: array}, the checkpoint keys."""
        return {name: p.data for name, p in self.named_parameters()}

    def get_submodule(self, path: str) -> "Module":
        mod = self
        for part in path.split(".") if path else ():
            child = getattr(mod, part, None)
            if not isinstance(child, Module):
                raise MiniPeftError(f"no module {path!r} (stopped at {part!r})")
            mod = child
        return mod

    def set_submodule(self, path: str, new: "Module") -> None:
        parent_path, _, name = path.rpartition(".")
        setattr(self.get_submodule(parent_path), name, new)

    # ---- modes ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, flag: bool = True):
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None


class ModuleList(Module):
    """Children named "0", "1", ... so that paths read `layers.3.mlp`."""

    def __init__(self, modules=()):
        self._n = 0
        for m in modules:
            self.append(m)

    def append(self, m: Module):
        setattr(self, str(self._n), m)
        self._n += 1

    def __len__(self):
        return self._n

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(self._n)[i]))

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._n))
