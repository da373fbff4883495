"""How one volume runs through a network: losses (`losses`), the exact slab schedule along H with
normalisation statistics over the whole volume (`slabs`), and spatial parallelism across processes
(`spatial`)."""
