"""kernels/: our own attention kernels (the seed's FlashAttention paragraph, section 1.7)."""
