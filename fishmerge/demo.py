"""`fishmerge demo`: the whole merge workflow on an embedded default, offline, in a couple of minutes on a CPU.

A small Llama is pretrained on the synthetic generator's general text, two copies are fine-tuned on two
topics, the Fisher of each is estimated on its own training data, and the two are merged with ``fisher`` and
``average``. The table shows what each model keeps of each topic: Fisher merging should keep more of both
than the plain average does.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
import yaml

from fishmerge.data.synthetic import general_sentences, topic_sentences
from fishmerge.data.tokenizer import build_word_level_tokenizer, word_sequences
from fishmerge.estimate import EstimateOptions, estimate_fisher
from fishmerge.merge import merge
from fishmerge.modeling import build_small_llama
from fishmerge.textdata import batches
from fishmerge.training import EvalResult, evaluate, make_optimizer, train

logger = logging.getLogger(__name__)

TOPIC_A, TOPIC_B = "python", "cooking"


def run_demo(output_dir: Path, *, seed: int = 0, quick: bool = False) -> list[tuple[str, EvalResult, EvalResult]]:
    """Run the demo into ``output_dir`` and return (model, result on A, result on B) rows."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scale = 4 if quick else 1
    general = general_sentences(3000 // scale, seed)
    train_a, train_b = topic_sentences(TOPIC_A, 600 // scale, seed + 1), topic_sentences(TOPIC_B, 600 // scale, seed + 2)
    test_a, test_b = topic_sentences(TOPIC_A, 200, seed + 11), topic_sentences(TOPIC_B, 200, seed + 12)
    counts = Counter(w for s in general + train_a + train_b for w in s.split())
    tokenizer = build_word_level_tokenizer(sorted(counts, key=lambda w: (-counts[w], w)))
    encode = lambda texts: word_sequences(tokenizer, texts)  # noqa: E731
    pad = tokenizer.pad_token_id

    logger.info("pretraining a small Llama on %d general sentences", len(general))
    model = build_small_llama(len(tokenizer), seed=seed, tokenizer=tokenizer)
    train(model, encode(general), epochs=2, batch_size=32, pad_id=pad, seed=seed,
          optimizer=make_optimizer("adamw", model.parameters(), lr=3e-3))
    base = _save(model, tokenizer, output_dir / "base")

    folders = {}
    for name, texts in (("a", train_a), ("b", train_b)):
        logger.info("fine-tuning model %s on %d sentences of one topic", name, len(texts))
        tuned = build_small_llama(len(tokenizer), seed=seed, tokenizer=tokenizer)
        tuned.load_state_dict(model.state_dict())
        train(tuned, encode(texts), epochs=3, batch_size=16, pad_id=pad, seed=seed,
              optimizer=make_optimizer("adamw", tuned.parameters(), lr=2e-3))
        folders[name] = _save(tuned, tokenizer, output_dir / f"model_{name}")
        data = output_dir / f"train_{name}.txt"
        data.write_text("\n".join(texts) + "\n")
        estimate_fisher(folders[name], data, output_dir / f"fisher_{name}",
                        EstimateOptions(device="cpu", batch_size=16, max_length=21, overwrite=True))

    models = [{"model": str(folders[n]), "fisher": str(output_dir / f"fisher_{n}")} for n in ("a", "b")]
    for method in ("fisher", "average"):
        recipe = {"method": method, "models": models}
        (output_dir / f"{method}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        merge(recipe, output_dir / f"merged_{method}", overwrite=True)

    from transformers import AutoModelForCausalLM

    rows = []
    for label, folder in (("base (pretrained)", base), (f"fine-tuned on {TOPIC_A}", folders["a"]),
                          (f"fine-tuned on {TOPIC_B}", folders["b"]),
                          ("merge: fisher", output_dir / "merged_fisher"),
                          ("merge: average", output_dir / "merged_average")):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        results = [evaluate(loaded, batches(encode(test), 64, pad)) for test in (test_a, test_b)]
        rows.append((label, *results))
    return rows


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def format_table(rows) -> str:
    """A plain-text table of loss and next-token accuracy on both topics."""
    header = f"{'model':<24} {'loss ' + TOPIC_A:>12} {'acc ' + TOPIC_A:>11} {'loss ' + TOPIC_B:>13} {'acc ' + TOPIC_B:>12}"
    lines = [header, "-" * len(header)]
    for label, a, b in rows:
        lines.append(f"{label:<24} {a.loss:>12.3f} {a.accuracy:>11.3f} {b.loss:>13.3f} {b.accuracy:>12.3f}")
    return "\n".join(lines)
