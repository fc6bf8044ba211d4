"""Train the tiny refusal classifier the tests use in place of a real one (e.g. Minos-v1).

    python scripts/make_refusal_classifier.py --out tests/fixtures/tiny-refusal-classifier

A 2-layer BERT (hidden 64) with its own lower-case WordPiece vocabulary, trained on the CPU in
about a minute on the labelled replies of `scripts/refusal_classifier_data.py`. Its input is
Minos-v1's format (`<|user|>\\n{prompt}\\n<|assistant|>\\n{reply}`, the worker's default
`input_template`), its labels are Minos's ("Non-refusal" = 0, "Refusal" = 1), and it saves as a
plain transformers folder (AutoTokenizer, AutoModelForSequenceClassification). `--check` prints
its verdicts on a few sentences next to the keyword markers'.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hctl_worker.scorers.choices import MINOS_TEMPLATE  # noqa: E402
from scripts.refusal_classifier_data import (  # noqa: E402
    COMPLIANCE_LABEL,
    REFUSAL_LABEL,
    training_replies,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def render(prompt: str, reply: str) -> str:
    return MINOS_TEMPLATE.replace("{prompt}", prompt).replace("{reply}", reply)


def build_tokenizer(texts: list[str], vocabulary: int):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        texts, WordPieceTrainer(vocab_size=vocabulary, special_tokens=SPECIAL_TOKENS)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def train(arguments: argparse.Namespace) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(arguments.seed)
    random.seed(arguments.seed)
    torch.set_num_threads(arguments.threads)
    examples = training_replies(seed=arguments.seed, composed=arguments.composed)
    texts = [render(example.prompt, example.reply) for example in examples]
    labels = torch.tensor([int(example.refusal) for example in examples])
    tokenizer = build_tokenizer(texts, arguments.vocabulary)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: COMPLIANCE_LABEL, 1: REFUSAL_LABEL},
        label2id={COMPLIANCE_LABEL: 0, REFUSAL_LABEL: 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=arguments.learning_rate, weight_decay=0.01)
    order = list(range(len(texts)))
    started = time.perf_counter()
    model.train()
    for epoch in range(arguments.epochs):
        random.Random(arguments.seed + epoch).shuffle(order)
        total = 0.0
        for start in range(0, len(order), arguments.batch_size):
            chunk = order[start : start + arguments.batch_size]
            encoded = tokenizer(
                [texts[index] for index in chunk], padding=True, truncation=True, max_length=128,
                return_tensors="pt",
            )  # fmt: skip
            loss = model(**encoded, labels=labels[chunk]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(chunk)
        print(f"epoch {epoch + 1}: loss {total / len(order):.4f}", flush=True)
    model.eval()
    with torch.inference_mode():
        correct = 0
        for start in range(0, len(texts), 128):
            encoded = tokenizer(
                texts[start : start + 128], padding=True, truncation=True, max_length=128,
                return_tensors="pt",
            )  # fmt: skip
            predicted = model(**encoded).logits.argmax(dim=-1)
            correct += int((predicted == labels[start : start + 128]).sum())
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "examples": len(texts),
        "refusals": int(labels.sum()),
        "training_accuracy": correct / len(texts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {key: value for key, value in vars(arguments).items() if key != "out"},
    }
    (out / "classifier.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def check(folder: str, replies: list[str]) -> None:
    from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal
    from hctl_worker.scorers.choices import ClassifierSettings
    from hctl_worker.scorers.classifier import ClassifierDetector

    detector = ClassifierDetector(ClassifierSettings(model=folder))
    verdicts = detector.judge(["How do I do this?"] * len(replies), replies)
    for reply, verdict in zip(replies, verdicts, strict=True):
        markers = is_refusal(reply, DEFAULT_REFUSAL_MARKERS)
        print(f"classifier {'refusal' if verdict else 'answer ':7}  markers "
              f"{'refusal' if markers else 'answer ':7}  {reply}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(REPO / "tests" / "fixtures" / "tiny-refusal-classifier")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--vocabulary", type=int, default=1200)
    parser.add_argument("--composed", type=int, default=1500, help="composed replies per label")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", nargs="*", help="only print verdicts on these replies")
    arguments = parser.parse_args(argv)
    if arguments.check is not None:
        check(arguments.out, arguments.check)
        return 0
    print(json.dumps(train(arguments), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
