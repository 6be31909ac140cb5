"""benchmarks/bench_methods.py, the README's measured methods table, has a row for every registered method
(and the seed's columns for it), so a new method cannot miss the table; and a procedure's row really runs it."""
import os
import sys

import minipeft as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_methods  # noqa: E402


def test_every_registered_method_has_a_row():
    rows = bench_methods.configs(mp, 30)
    names = {m.name for m in mp.methods()}
    assert names - set(rows) == set()
    variants = set(rows) - names - {"full"}  # a second row of one method at other fields (loretta_adp)
    assert "full" in rows and all(any(v.startswith(n + "_") for n in names) for v in variants)
    assert set(rows) == set(bench_methods.SEED)


def test_an_optimiser_or_procedure_row_gives_its_training_fields():
    rows = bench_methods.configs(mp, 30)
    model = mp.load_model(mp.DEMO_MODEL)
    rows["chainlora"][0](model, [])
    fields = rows["chainlora"][2](model, 30, [])
    assert [type(h).__name__ for h in fields["hooks"]] == ["ChainLoRAHook"]
    assert fields["hooks"][0].opts.links == (10, 10, 10)
    assert type(rows["loraplus"][2](model, 30, [])["optimizer"]).__name__ == "LoraPlusConfig"
    assert len(rows["lora"]) == 2  # a layer method trains with the plain AdamW
