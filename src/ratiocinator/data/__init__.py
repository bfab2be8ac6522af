"""The spec's data, brought to every host the runs use.

    spec ``data:`` ─► `sources` ─► `local_copy` (this machine: in place, or fetched once into the home's cache,
                                   checksummed) ─► per backend: used as is (local), pushed over SFTP (SSH, Vast),
                                   or through Ray's object store (Ray) into the host's content-addressed cache

Runs see ``RATIOCINATOR_DATA_DIR`` pointing at their host's copy; the ledger records where the
data came from and its checksums (`provenance`), so a resumed experiment never mixes datasets.
"""
