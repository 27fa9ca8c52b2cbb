"""Load checkpoint folders the way a user of another transformers version does, and report what came out.

Run by tests/test_compat.py in .venv-tf4 (transformers 4.x) as a script, and imported in the main
environment (transformers 5.x), so both versions run the very same code:

    python tests/compat_client.py OUT.npz FOLDER [FOLDER ...]

For each folder: the config's RoPE base and head counts, the model's float32 logits on fixed token
ids, and, when the folder has a tokenizer, its class, the ids of a sample text and of a chat prompt,
and six greedily generated tokens after that prompt. It imports only transformers, torch and numpy (never gqa_uptrain, which needs transformers 5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

SAMPLE_TEXT = "Grouped-query attention shares each key/value head among a group of query heads."
IDS = [[1, 5, 9, 23, 7, 2, 11, 3, 17, 4, 8, 6]]


def describe(folder: str | Path) -> dict:
    """What transformers (whichever version is installed) makes of ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    out: dict = {
        "rope_theta": float(theta if theta is not None else getattr(config, "rope_theta", float("nan"))),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
    }
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(IDS) % config.vocab_size
    with torch.no_grad():
        out["logits"] = model(ids).logits.float().numpy()
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        out["tokenizer_class"] = type(tok).__name__
        out["model_max_length"] = int(tok.model_max_length)
        out["text_ids"] = list(tok(SAMPLE_TEXT)["input_ids"])
        if tok.chat_template:
            chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
            out["chat_ids"] = list(chat if isinstance(chat, list) else chat["input_ids"])
            prompt = torch.tensor([out["chat_ids"]])
            with torch.no_grad():
                gen = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
                )
            out["generated_ids"] = gen[0, prompt.shape[1] :].tolist()
    return out


def main(argv: list[str]) -> None:
    import transformers

    dest, folders = argv[0], argv[1:]
    arrays, meta = {}, {"transformers": transformers.__version__, "folders": {}}
    for i, folder in enumerate(folders):
        d = describe(folder)
        arrays[f"logits_{i}"] = d.pop("logits")
        meta["folders"][folder] = d
    np.savez(dest, meta=np.array(json.dumps(meta)), **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
