"""data/: raw text -> curated documents -> BPE tokenizer -> token shards (seed Part 1, sections 1.1-1.3)."""
