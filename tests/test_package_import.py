"""``import gqa_uptrain`` is cheap, its entry points are lazy, and the GQA classes still register.

Each check runs in a fresh interpreter: what an import does depends on what was imported before.
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


def python(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
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
            print(json.dumps(sorted(m for m in ("torch", "transformers", "datasets", "accelerate") if m in sys.modules)))
            """
        )
    )
    assert heavy == []


def test_lazy_names_are_the_real_objects():
    from gqa_uptrain import ConversionResult, convert, evaluate, load_recipe, push_folder, uptrain
    from gqa_uptrain.conversion.pipeline import ConversionResult as CR
    from gqa_uptrain.conversion.pipeline import convert as conversion_convert
    from gqa_uptrain.evaluation import evaluate as evaluation_evaluate
    from gqa_uptrain.hub.publish import push_folder as hub_push_folder
    from gqa_uptrain.training.config import load_recipe as config_load_recipe
    from gqa_uptrain.training.loop import uptrain as training_uptrain

    assert uptrain is training_uptrain and evaluate is evaluation_evaluate
    assert load_recipe is config_load_recipe and convert is conversion_convert and ConversionResult is CR
    assert push_folder is hub_push_folder
    assert {"uptrain", "evaluate", "load_recipe", "convert"} <= set(dir(gqa_uptrain))
    assert set(gqa_uptrain.__all__) <= set(dir(gqa_uptrain))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        gqa_uptrain.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from gqa_uptrain import nope")


@pytest.fixture(scope="module")
def converted_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 converted to GQA-2: a family only loadable through the registered classes."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lazy-registration")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(root / "src")
    gqa_uptrain.convert(root / "src", root / "gpt2-gqa2", 2, progress=False)
    return root / "gpt2-gqa2"


# The import orders that matter: the package before transformers (registration waits for the Auto
# classes), transformers before the package (registration at once), and the Auto classes first
# imported from inside transformers.modeling_utils (registration waits for the outermost import).
ORDERS = {
    "package-first": "import gqa_uptrain\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    "transformers-first": "from transformers import AutoConfig, AutoModelForCausalLM\nimport gqa_uptrain",
    "nested": "import gqa_uptrain\nfrom transformers import PreTrainedModel\n"
    "from transformers import AutoConfig, AutoModelForCausalLM",
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_converted_checkpoint_loads_with_stock_auto_classes_after_import(converted_gpt2, order):
    out = json.loads(
        python(
            ORDERS[order]
            + textwrap.dedent(
                """
                import json, sys
                folder = sys.argv[1]
                config = AutoConfig.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code
                finders = [type(f).__name__ for f in sys.meta_path if "Register" in type(f).__name__]
                print(json.dumps({"config": type(config).__module__ + "." + type(config).__name__,
                                  "model": type(model).__module__ + "." + type(model).__name__,
                                  "kv": model.config.num_key_value_heads, "finders": finders}))
                """
            ),
            str(converted_gpt2),
        )
    )
    assert out == {
        "config": "gqa_uptrain.modeling.modeling_gpt2_gqa.GPT2GQAConfig",
        "model": "gqa_uptrain.modeling.modeling_gpt2_gqa.GPT2GQALMHeadModel",
        "kv": 2,
        "finders": [],  # the import hook is gone once it has registered
    }
