"""The eval stage: catch degenerate output, measure preservation and perplexity, run benchmark subsets."""
