"""The train stage: QLoRA on a token slice of RedPajama-style text, resumable, tracked, exported merged."""
