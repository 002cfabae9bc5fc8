"""The pieces of scripts/rehearse.py: random checkpoints at real widths, an offline tokenizer with Llama's
vocabulary size, benchmark files at real lengths, the per-process meter, the NF4 checks and the report."""
