"""nnU-Net v2 plans whose patch and batch size are the largest fullres's dry run fits in a memory budget
(`plans`)."""
