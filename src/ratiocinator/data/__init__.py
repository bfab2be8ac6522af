"""The spec's data, brought to every host the runs use.

    spec ``data:`` ─► `local_copy` (this machine: a directory in place, or URLs, an rsync directory or a
                      Hugging Face revision fetched once into the home's cache, checksummed; `staging`: before
                      anything is rented) ─► per backend: used as is (local), pushed over SFTP (SSH, Vast:
                      `backends.ssh_data`), or through Ray's object store (Ray: `assemble`) into the host's
                      content-addressed cache

Runs see ``RATIOCINATOR_DATA_DIR`` pointing at their host's copy; the ledger records where the
data came from and its checksums (`provenance`), so a resumed experiment never mixes datasets.
"""
