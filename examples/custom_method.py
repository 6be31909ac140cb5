"""Adding a method to minipeft from outside the package: the whole contract in one file.

RowScale (a teaching example, not a paper's method): each targeted layer learns d (out,), zero at
init, and computes h = W0 x + b + d ⊙ (W0 x), i.e. dW = diag(d) W0. It is IA³ written as an additive
delta (l = 1 + d, bias left alone), small enough to read in a minute.

The contract (README "Adding a method", spec/methods.md):
  1. a config dataclass deriving from AdapterConfig, with its own peft_type (PEFT does not know this
     one: in_peft=False) and validate() for its fields;
  2. a layer class deriving from Delta: create() builds one per targeted layer, adapt(x, y, base)
     returns the layer's output with the adapter, delta_weight() is dW (out, in) for merges (or
     merge_into / unmerge_from where the merge is not W + dW, as here);
     trainable tensors are attributes with the names the file keys end in (rowscale_d);
  3. trainable_count(layers, mc) on the config: the spec's parameter count;
  4. one register(...) call.
Then apply, train, save (PEFT's folder layout), load and merge work with no other edit.

    python examples/custom_method.py        # trains it on the carried model's `next` task, ~5 s
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minipeft as mp  # noqa: E402
from minipeft import backend  # noqa: E402
from minipeft.adapters.base import AdapterConfig, Delta, check, orient, trainable  # noqa: E402


@dataclasses.dataclass
class RowScaleConfig(AdapterConfig):
    target_modules: tuple | str = "all-linear"
    init_scale: float = 0.0  # d's value at init: 0 gives h = W0 x + b exactly

    peft_type = "MINIPEFT_ROWSCALE"  # PEFT has no such tuner: its own peft_type, loaded by minipeft only
    PEFT_FIELDS = {"init_scale": "init_scale"}  # our field -> its adapter_config.json key
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check(isinstance(self.init_scale, (int, float)), "init_scale", self.init_scale, "must be a number")

    def trainable_count(self, layers: dict, mc) -> int:
        """One d entry per output feature of each targeted layer: sum out."""
        return sum(out for _, out in layers.values())


class RowScaleLinear(Delta):
    MIXED_BATCH = True  # its adapt() is y + (something of the example's own rows): mixed batches work

    def __init__(self, out_features: int, init_scale: float):
        xp = backend.xp()
        self.rowscale_d = trainable(xp.full((out_features,), init_scale, dtype=backend.dtype("float32")))  # d (out,)

    @classmethod
    def create(cls, base, cfg: RowScaleConfig, path: str, rng, init_weights: bool = True):
        return cls(base.out_features, float(cfg.init_scale))

    def adapt(self, x, y, base):  # h = W0 x + b + d ⊙ (W0 x)
        w0x = y if base.bias is None else y - base.bias  # (..., out)
        return y + self.rowscale_d * w0x

    # Delta's merge adds delta_weight() to W; RowScale's dW = diag(d) W0 needs W0, so it merges itself
    def merge_into(self, base):  # W <- (1 + d) ⊙_rows W0
        self._scale(base, 1.0 + self.rowscale_d.data)

    def unmerge_from(self, base):
        self._scale(base, 1.0 / (1.0 + self.rowscale_d.data))

    @staticmethod
    def _scale(base, factor):
        base.weight.data = orient(base.weight_out_in() * factor[:, None], base)


METHOD = mp.register_method(
    "rowscale", RowScaleConfig, RowScaleLinear, in_peft=False,
    paper="a teaching example in examples/custom_method.py (IA3, arXiv:2205.05638, as an additive delta)",
    summary="RowScale: h = W0 x + b + d ⊙ (W0 x), d (out,) trained from 0 (examples/custom_method.py).")


def main(argv=None):
    from tasks import examples
    held = examples("next", 50, seed=123)
    train = examples("next", 1000, seed=7, exclude={e["prompt"] for e in held})
    model = mp.load_model(mp.DEMO_MODEL)
    before = model(backend.asarray([[5, 6, 7]])).numpy()
    model.apply_rowscale(target_modules="all-linear")  # the shorthand the registry made
    trainable_n, total = model.parameter_counts()
    print(f"rowscale: {trainable_n:,} trainable of {total:,}; at init the logits move by "
          f"{abs(model(backend.asarray([[5, 6, 7]])).numpy() - before).max():.1e}")
    hist = model.train(train, mp.TrainingConfig(learning_rate=3e-2, batch_size=16, max_steps=60, progress=False))
    print(f"loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f} in {len(hist['loss'])} steps")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapters(tmp)
        again = mp.load_model(mp.DEMO_MODEL)
        again.load_adapters(tmp)
        ids = backend.asarray([[5, 6, 7, 8]])
        a, b = model(ids).numpy(), again(ids).numpy()
        print(f"saved and reloaded: max logit difference {abs(a - b).max():.1e}")
        merged = again.merge_and_unload()(ids).numpy()
        print(f"merged: max logit difference {abs(merged - a).max():.1e}")
    return hist


if __name__ == "__main__":
    main()
