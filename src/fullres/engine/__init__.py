"""How one volume runs through a network: losses (`losses`), the paper's network's exact slab schedule
along H with normalisation statistics over the whole volume (`slabs`), any convolutional network's forward
recorded and replayed in slabs (`tape`), and spatial parallelism across processes (`spatial`)."""
