"""`phoenix demo`, the whole story offline on a CPU, with what it needs: generated FineWeb-like shards and
`localhub`, a local Hub (Xet, Storage Buckets, storage accounting, fault hooks) that the tests use too."""
