"""Local benchmark files in the hub schemas, with texts as long (in tokens) as the real datasets' items.

The eval stage reads `eval.benchmarks.data_dir` laid out as scripts/fetch_benchmarks.py writes it; here every
question, choice and context is a window of the bundled corpus cut to a target token count, so that a 25-shot
ARC context comes out near the ~1.3k tokens of the real one and the forward passes have their real sizes.
The targets are the typical item lengths of each dataset in Llama tokens (estimates); MMLU carries one long
subject (professional_law, whose 5-shot contexts run to ~2k tokens), the worst case for memory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Tokens per field, as in the real datasets (typical lengths; estimates).
ARC = {"question": 40, "choice": 6}
HELLASWAG = {"label": 3, "ctx_a": 40, "ctx_b": 8, "ending": 20}
MMLU = {"astronomy": (60, 8), "high_school_geography": (45, 6), "professional_law": (300, 30)}  # (question, choice)
TRUTHFULQA = {"question": 15, "choice": 12}
FEWSHOT_ROWS = 30  # more than the 25 shots ARC draws


class TextWindows:
    """Texts of a given token length: consecutive windows of the corpus's token stream, decoded."""

    def __init__(self, tokenizer, texts: list[str], seed: int, documents: int = 60):
        self.tokenizer = tokenizer
        encoded = tokenizer(texts[:documents], add_special_tokens=False).input_ids  # ~100k tokens: plenty of windows
        self.stream = [token for ids in encoded for token in ids]
        self.rng = random.Random(seed)

    def text(self, tokens: int) -> str:
        start = self.rng.randrange(0, len(self.stream) - tokens)
        return " ".join(self.tokenizer.decode(self.stream[start:start + tokens]).split())


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _arc_rows(windows: TextWindows, count: int, prefix: str) -> list[dict]:
    rng = windows.rng
    return [{"id": f"{prefix}{i}", "question": windows.text(ARC["question"]),
             "choices": {"text": [windows.text(ARC["choice"]) for _ in range(4)], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[rng.randrange(4)]} for i in range(count)]


def _hellaswag_rows(windows: TextWindows, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        ctx_a, ctx_b = windows.text(HELLASWAG["ctx_a"]), windows.text(HELLASWAG["ctx_b"])
        rows.append({"ind": i, "activity_label": windows.text(HELLASWAG["label"]), "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": [windows.text(HELLASWAG["ending"]) for _ in range(4)],
                     "source_id": f"rehearsal~{i}", "split": "val", "split_type": "indomain",
                     "label": str(windows.rng.randrange(4))})
    return rows


def _mmlu_rows(windows: TextWindows, subject: str, count: int) -> list[dict]:
    question, choice = MMLU[subject]
    return [{"question": windows.text(question), "subject": subject,
             "choices": [windows.text(choice) for _ in range(4)], "answer": windows.rng.randrange(4)}
            for _ in range(count)]


def _truthfulqa_rows(windows: TextWindows, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        choices = [windows.text(TRUTHFULQA["choice"]) for _ in range(6)]
        rows.append({"question": windows.text(TRUTHFULQA["question"]),
                     "mc1_targets": {"choices": choices[:4], "labels": [1, 0, 0, 0]},
                     "mc2_targets": {"choices": choices, "labels": [1, 1, 0, 0, 0, 0]}})
    return rows


def write_benchmarks(folder: Path, tokenizer, texts: list[str], items: int, seed: int = 0) -> None:
    """`items` scored items per benchmark (per MMLU subject), and enough few-shot rows for the leaderboard shots."""
    windows = TextWindows(tokenizer, texts, seed)
    _write(folder / "arc_challenge" / "train.jsonl", _arc_rows(windows, FEWSHOT_ROWS, "train"))
    _write(folder / "arc_challenge" / "test.jsonl", _arc_rows(windows, items, "test"))
    _write(folder / "hellaswag" / "train.jsonl", _hellaswag_rows(windows, FEWSHOT_ROWS))
    _write(folder / "hellaswag" / "validation.jsonl", _hellaswag_rows(windows, items))
    for subject in MMLU:
        _write(folder / "mmlu" / subject / "dev.jsonl", _mmlu_rows(windows, subject, 6))
        _write(folder / "mmlu" / subject / "test.jsonl", _mmlu_rows(windows, subject, items))
    _write(folder / "truthfulqa_mc2" / "validation.jsonl", _truthfulqa_rows(windows, items))


def fewshot_context_tokens(folder: Path, tokenizer, shots: dict[str, int]) -> dict[str, int]:
    """Tokens of one scored context at the configured shots, in the task templates' formats (eval/tasks/)."""
    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    arc = rows(folder / "arc_challenge" / "train.jsonl")
    arc_shot = [f"Question: {r['question']}\nAnswer: {r['choices']['text'][0]}" for r in arc]
    hella = rows(folder / "hellaswag" / "train.jsonl")
    hella_shot = [f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()} {r['endings'][0]}" for r in hella]
    law = rows(folder / "mmlu" / "professional_law" / "dev.jsonl")
    law_shot = ["{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer: A".format(r["question"], *r["choices"]) for r in law]
    return {
        "arc_challenge": count("\n\n".join(arc_shot[: shots["arc_challenge"] + 1])),
        "hellaswag": count("\n\n".join(hella_shot[: shots["hellaswag"] + 1])),
        "mmlu (professional_law)": count("\n\n".join(law_shot[: shots["mmlu"] + 1])),
    }
