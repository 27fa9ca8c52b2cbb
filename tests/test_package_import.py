"""``import gqa_uptrain`` is cheap and its entry points are lazy; our GQA classes are registered with
transformers' Auto classes by an explicit call (``gqa_uptrain.register_auto_classes()``), which our
own model loader makes, and never as a side effect of importing the package.

Each check runs in a fresh interpreter: what an import does depends on what was imported before.
That a converted folder loads with ``trust_remote_code=True`` alone, where ``gqa_uptrain`` cannot even
be imported, is checked for every family by ``test_convert_custom.py``
(``test_converted_checkpoint_loads_with_remote_code_alone``) and ``test_modeling.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gqa_uptrain

REPO = Path(__file__).resolve().parents[1]

# Generous: the import takes about 10 ms; anything that pulls in torch or transformers takes seconds.
IMPORT_SECONDS = 0.5


def python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (offline, this checkout first); its last line of output."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_import_loads_neither_torch_nor_transformers():
    heavy = json.loads(
        python(
            """
            import json, sys
            import gqa_uptrain
            from gqa_uptrain import GQAError, ConfigError
            heavy = ("torch", "transformers", "datasets", "accelerate", "huggingface_hub")
            print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
            """
        )
    )
    assert heavy == []


def test_import_takes_milliseconds():
    # The best of three imports, each in its own interpreter: one slow run on a busy machine is noise.
    times = [
        float(
            python(
                """
                import time
                start = time.perf_counter()
                import gqa_uptrain
                print(time.perf_counter() - start)
                """
            )
        )
        for _ in range(3)
    ]
    assert min(times) < IMPORT_SECONDS, times


def test_lazy_names_are_the_real_objects():
    from gqa_uptrain import ConversionResult, convert, evaluate, load_recipe, push_folder, uptrain
    from gqa_uptrain.conversion.pipeline import ConversionResult as CR
    from gqa_uptrain.conversion.pipeline import convert as conversion_convert
    from gqa_uptrain.evaluation import evaluate as evaluation_evaluate
    from gqa_uptrain.hub.publish import push_folder as hub_push_folder
    from gqa_uptrain.modeling import register_auto_classes as modeling_register
    from gqa_uptrain.training.config import load_recipe as config_load_recipe
    from gqa_uptrain.training.loop import uptrain as training_uptrain

    assert uptrain is training_uptrain and evaluate is evaluation_evaluate
    assert load_recipe is config_load_recipe and convert is conversion_convert and ConversionResult is CR
    assert push_folder is hub_push_folder and gqa_uptrain.register_auto_classes is modeling_register
    assert {"uptrain", "evaluate", "load_recipe", "convert", "register_auto_classes"} <= set(dir(gqa_uptrain))
    assert set(gqa_uptrain.__all__) <= set(dir(gqa_uptrain))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        gqa_uptrain.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from gqa_uptrain import nope")


@pytest.fixture(scope="module")
def converted_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 converted to GQA-2: a family only loadable through our classes."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("registration")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(root / "src")
    gqa_uptrain.convert(root / "src", root / "gpt2-gqa2", 2, progress=False)
    return root / "gpt2-gqa2"


OURS = {
    "config": "gqa_uptrain.modeling.modeling_gpt2_gqa.GPT2GQAConfig",
    "model": "gqa_uptrain.modeling.modeling_gpt2_gqa.GPT2GQALMHeadModel",
    "kv": 2,
}


def test_stock_auto_classes_load_after_register_auto_classes(converted_gpt2):
    """Importing the package registers nothing (transformers refuses the folder's code unasked);
    after ``gqa_uptrain.register_auto_classes()`` the stock Auto classes load it, no remote code."""
    out = json.loads(
        python(
            """
            import json, sys
            import gqa_uptrain
            from transformers import AutoConfig, AutoModelForCausalLM

            folder = sys.argv[1]
            try:
                AutoConfig.from_pretrained(folder, trust_remote_code=False)
                before = "loaded"
            except ValueError as e:
                before = "refused: trust_remote_code" if "trust_remote_code" in str(e) else str(e)
            gqa_uptrain.register_auto_classes()
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
            print(json.dumps({"before": before,
                              "config": type(config).__module__ + "." + type(config).__name__,
                              "model": type(model).__module__ + "." + type(model).__name__,
                              "kv": model.config.num_key_value_heads}))
            """,
            str(converted_gpt2),
        )
    )
    assert out == {"before": "refused: trust_remote_code", **OURS}


def test_our_loader_registers_the_classes_itself(converted_gpt2):
    """``gqa-eval``'s loader (and the uptraining's: the same one) registers before it loads, so a
    converted folder loads through our classes even where remote code is refused."""
    out = json.loads(
        python(
            """
            import json, sys
            from gqa_uptrain.evaluation import load_model

            lm = load_model(sys.argv[1], device="cpu", trust_remote_code=False)
            config, model = lm.model.config, lm.model
            print(json.dumps({"config": type(config).__module__ + "." + type(config).__name__,
                              "model": type(model).__module__ + "." + type(model).__name__,
                              "kv": config.num_key_value_heads}))
            """,
            str(converted_gpt2),
        )
    )
    assert out == OURS
